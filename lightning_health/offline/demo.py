"""The demo: train the patients of :mod:`lightning_health.offline.patients` and say what the monitor found.

The same 8-16-16-16-16-4 ReLU MLP on the same 80 synthetic samples, trained with plain SGD three
times, one run per disease the dashboards are for: healthy (Kaiming initialisation, learning rate
0.05), dying (Kaiming, lr 0.2, a bias penalty of the wrong sign: units die one after another, no NaN)
and exploding (N(0, 1) initialisation, lr 0.8: NaN from step 3). Each run gets a
:class:`~lightning_health.HealthMonitor` and its own TensorBoard run under ``out_dir/<name>``;
``lightning-health demo`` prints each run's chart and findings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from lightning_health.callback import HealthMonitor


@dataclass(frozen=True)
class Patient:
    """One dosing of the demo network."""

    name: str
    init: Literal["kaiming", "normal"]
    lr: float
    bias_pull: float = 0.0

    @property
    def label(self) -> str:
        """For example ``"exploding (N(0,1) init, lr 0.8)"``."""
        init = "Kaiming init" if self.init == "kaiming" else "N(0,1) init"
        pull = f", bias pull {self.bias_pull:g}" if self.bias_pull else ""
        return f"{self.name} ({init}, lr {self.lr:g}{pull})"


HEALTHY = Patient("healthy", "kaiming", 0.05)
DYING = Patient("dying", "kaiming", 0.2, bias_pull=1.5)
EXPLODING = Patient("exploding", "normal", 0.8)
SICK = EXPLODING  # the name of the exploding patient before the demo had three
PATIENTS: tuple[Patient, ...] = (HEALTHY, DYING, EXPLODING)

#: TensorBoard's flag to serve every logged step. Not ``=0``: TensorBoard 2.x reads 0 as "downsample to
#: zero points" and shows empty charts; without the flag it serves a sample (1000 scalars, 10 images a tag).
EVERY_STEP_FLAG = "--samples_per_plugin=scalars=100000,histograms=10000,images=10000,text=10000"


@contextlib.contextmanager
def quiet_training() -> Iterator[None]:
    """Keep the demo's printout to the diagnosis: no Lightning banners and tips, no live warnings.

    The monitor's critical findings still happen (and are printed after each run); only their
    ``RuntimeWarning`` echoes, and Lightning's info lines and deprecation notices, are held back.
    """
    import lightning_health.callback  # noqa: F401  (imports Lightning now: its import sets its loggers to INFO)

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "pytorch_lightning")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="critical health finding", category=RuntimeWarning)
            warnings.filterwarnings("ignore", module=r"(lightning|pytorch_lightning)\.")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@dataclass
class PatientRun:
    """What one patient's training produced."""

    patient: Patient
    monitor: HealthMonitor
    log_dir: str
    final_loss: float | None
    steps: int = field(default=0)


def replace_previous_run(run_dir: Path) -> int:
    """Delete the event files an earlier demo left in ``run_dir`` (a second file would draw every step twice).

    Only the demo's own run folders are touched, and in them only TensorBoard event files. Returns
    how many were deleted.
    """
    old = [f for f in run_dir.glob("*tfevents*") if f.is_file()] if run_dir.is_dir() else []
    for event_file in old:
        event_file.unlink()
    return len(old)


def train_patient(
    patient: Patient,
    out_dir: str | os.PathLike[str],
    *,
    epochs: int = 30,
    batch_size: int = 16,
    every_n_steps: int = 1,
    dead_window: int = 2,
    progress: bool = True,
    seed: int = 11,
) -> PatientRun:
    """Train one patient on the CPU with a HealthMonitor and a TensorBoard run at ``out_dir/<patient.name>``.

    Args:
        patient: The dosing.
        out_dir: The TensorBoard log directory holding one run per patient.
        epochs: Passes over the 80 samples.
        batch_size: Samples per SGD step (80 / batch_size steps an epoch).
        every_n_steps: The monitor's sampling interval. The sick patient's disease runs its course in a
            few steps, so the demo reads every step.
        dead_window: Sampled batches a unit must stay silent on to count as dead.
        progress: Show Lightning's progress bar.
        seed: The initialisation seed (the data is always the same).
    """
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_health.callback import HealthMonitor
    from lightning_health.offline.patients import PatientMLP, patient_loaders

    replace_previous_run(Path(out_dir) / patient.name)
    pl.seed_everything(seed, verbose=False)
    monitor = HealthMonitor(every_n_steps=every_n_steps, dead_window=dead_window, verbose=False)
    logger = TensorBoardLogger(str(out_dir), name=patient.name, version="", default_hp_metric=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=logger,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    train_loader, val_loader = patient_loaders(batch_size=batch_size)
    model = PatientMLP(init=patient.init, lr=patient.lr, seed=seed, bias_pull=patient.bias_pull)
    trainer.fit(model, train_loader, val_loader)
    loss = trainer.callback_metrics.get("train_loss")
    return PatientRun(
        patient=patient,
        monitor=monitor,
        log_dir=str(Path(logger.log_dir)),
        final_loss=float(loss) if loss is not None else None,
        steps=trainer.global_step,
    )
