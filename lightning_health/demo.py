"""The two patients: one small ReLU network trained twice, once healthy and once sick.

Both runs use the same 8-16-16-16-16-4 ReLU MLP on the same synthetic 4-class data set (80
samples, 8 features, seeded) with plain SGD. Only the dosing differs: the healthy patient gets
Kaiming initialisation and a learning rate of 0.05, the sick one weights drawn from N(0, 1) and a
learning rate of 0.8. ``lightning-health demo`` trains both on the CPU with a :class:`HealthMonitor`
and a TensorBoard logger each, and prints what the monitor found.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

if TYPE_CHECKING:
    import lightning.pytorch as pl

WIDTHS: tuple[int, ...] = (8, 16, 16, 16, 16, 4)


@dataclass(frozen=True)
class Patient:
    """One training recipe for the demo network."""

    name: str
    init: str
    lr: float

    @property
    def label(self) -> str:
        """``"sick (N(0,1) init, lr 0.8)"``."""
        init = "Kaiming init" if self.init == "kaiming" else "N(0,1) init"
        return f"{self.name} ({init}, lr {self.lr:g})"


HEALTHY = Patient("healthy", "kaiming", 0.05)
SICK = Patient("sick", "normal", 0.8)
PATIENTS: tuple[Patient, ...] = (HEALTHY, SICK)


def make_dataset(samples: int = 80, features: int = 8, classes: int = 4, seed: int = 7) -> TensorDataset:
    """Gaussian blobs around ``classes`` random centres; the same tensors for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(classes, features, generator=generator)
    targets = torch.arange(samples) % classes
    inputs = centres[targets] + torch.randn(samples, features, generator=generator)
    return TensorDataset(inputs, targets)


def make_network(init: str, seed: int = 11, widths: Sequence[int] = WIDTHS) -> nn.Sequential:
    """``Linear -> ReLU`` blocks and a final ``Linear``; ``init`` is ``"kaiming"`` or ``"normal"`` (N(0, 1)).

    Raises:
        ValueError: If ``init`` is neither.
    """
    if init not in ("kaiming", "normal"):
        raise ValueError(f"Expected `init` to be 'kaiming' or 'normal', got {init!r}")
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        linear = nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            std = (2.0 / fan_in) ** 0.5 if init == "kaiming" else 1.0
            linear.weight.copy_(std * torch.randn(fan_out, fan_in, generator=generator))
            linear.bias.zero_()
        layers.append(linear)
        if index < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _lightning_module(patient: Patient, seed: int) -> pl.LightningModule:
    import lightning.pytorch as pl

    class PatientNet(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_network(patient.init, seed=seed)

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.net(inputs)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            inputs, targets = batch
            loss = F.cross_entropy(self(inputs), targets)
            self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=patient.lr)

    return PatientNet()


@dataclass
class PatientResult:
    """What one patient's run produced."""

    patient: Patient
    monitor: Any
    log_dir: str
    final_loss: float | None


def train_patient(
    patient: Patient,
    out_dir: str | os.PathLike[str],
    *,
    epochs: int = 30,
    batch_size: int = 16,
    every_n_steps: int = 1,
    dead_window: int = 1,
    progress: bool = True,
    seed: int = 11,
) -> PatientResult:
    """Train one patient with a HealthMonitor and a TensorBoard logger at ``out_dir/<patient.name>``."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_health import HealthMonitor

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
    loader = DataLoader(make_dataset(), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer.fit(_lightning_module(patient, seed), loader)
    loss = trainer.callback_metrics.get("train_loss")
    return PatientResult(patient, monitor, str(Path(logger.log_dir)), float(loss) if loss is not None else None)
