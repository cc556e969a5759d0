"""Nothing the monitor read is lost when the training process dies: SIGKILL mid-fit, then read the event files back.

Lightning gets no chance to run a hook on SIGKILL (no ``on_exception``, no ``teardown``), so every
sampled step must already be on disk when the next step starts; on CUDA, where a step's host copy is
read a training batch later, every step but the one still in flight.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

KILLED_FIT = """
import os, signal, sys
import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning_health import HealthMonitor
from lightning_health.pipeline import host_copy
from lightning_health.offline.patients import PatientMLP, patient_loaders
from tests.conftest import trainer_kwargs

class Kill(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)

host_copy.DEFER_ON_CPU = sys.argv[3] == "deferred"  # the CUDA path: a step lands a batch after its copy
monitor = HealthMonitor(every_n_steps=2, verbose=False)
kwargs = trainer_kwargs(max_epochs=50, logger=TensorBoardLogger(sys.argv[1], name="run"))
pl.Trainer(callbacks=[monitor, Kill()], **kwargs).fit(PatientMLP(), patient_loaders()[0])
"""


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run's event files, read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for version in sorted(run.iterdir()):
        events = EventAccumulator(str(version), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return out


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("copy", ["at once", "deferred"])
def test_every_sampled_step_before_a_sigkill_is_on_disk(tmp_path: Path, copy: str) -> None:
    kill_at = 13
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", KILLED_FIT, str(tmp_path), str(kill_at), copy],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=240,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    scalars = _scalars(tmp_path / "run")
    # at once (a CPU): step 12 was read and written before step 13 started. Deferred (CUDA): step 12's
    # copy lands at the end of batch 13, which SIGKILL (no hook runs) never reaches: one step is lost
    sampled = list(range(0, kill_at if copy == "at once" else kill_at - 1, 2))
    assert [s for s, _v in scalars["health/status"]] == sampled
    layer_tags = [tag for tag in scalars if tag.startswith("health/act_std/")]
    assert layer_tags
    for tag in layer_tags:
        assert [s for s, _v in scalars[tag]] == sampled, tag
