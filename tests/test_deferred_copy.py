"""The CUDA path's deferred host copy, run on a CPU: a sampled step lands a training batch later.

``host_copy.DEFER_ON_CPU`` holds CPU copies back exactly as CUDA copies are held back (only the event
wait differs), so these real fits check what a GPU run does: the same numbers as reading at once,
every step landed in order, nothing lost at the end of a fit, on an exception or in a checkpoint.
"""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_health import HealthMonitor
from lightning_health.offline.patients import PatientMLP, patient_loaders
from lightning_health.pipeline import host_copy
from tests.conftest import read_tb_scalars, trainer_kwargs


class Landed(pl.Callback):
    """After the monitor: at each batch end, the sampled steps whose readings the monitor holds."""

    def __init__(self, monitor: HealthMonitor) -> None:
        self.monitor = monitor
        self.seen: dict[int, list[int]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        curve = self.monitor.curves("act_std").get("net.1", [])
        self.seen[trainer.global_step - 1] = [s for s, _v in curve]


def _fit(tmp_path, deferred: bool, monkeypatch, *callbacks, steps: int = 12, model=None, **kw):
    monkeypatch.setattr(host_copy, "DEFER_ON_CPU", deferred)
    torch.manual_seed(0)
    monitor = HealthMonitor(every_n_steps=kw.pop("every", 1), verbose=False, burst_steps=0)
    logger = TensorBoardLogger(tmp_path, name="deferred" if deferred else "at_once")
    spy = Landed(monitor)
    trainer = pl.Trainer(
        callbacks=[monitor, spy, *callbacks],
        **trainer_kwargs(max_steps=steps, logger=logger, limit_val_batches=0, **kw),
    )
    trainer.fit(model or PatientMLP(), patient_loaders()[0])
    return monitor, spy, logger


def _same(a: dict, b: dict) -> bool:
    """Equal curves, NaN equal to NaN."""
    flat = lambda c: [(k, s, "nan" if math.isnan(v) else v) for k, pts in sorted(c.items()) for s, v in pts]  # noqa: E731
    return flat(a) == flat(b)


def test_deferred_steps_land_a_batch_later_with_the_same_numbers(tmp_path, monkeypatch):
    ref, _spy, ref_logger = _fit(tmp_path, False, monkeypatch)
    monitor, spy, logger = _fit(tmp_path, True, monkeypatch)
    assert spy.seen[5] == list(range(5))  # step 5 is in flight at its own batch end, step 4 has landed
    assert spy.seen[11] == list(range(11)) and [s for s, _v in monitor.curves("act_std")["net.1"]] == list(range(12))
    metrics = monitor._record.history.metrics()
    assert metrics == ref._record.history.metrics() and "update_ratio" in metrics
    for metric in metrics:  # every reading of every layer, bit for bit
        assert _same(monitor.curves(metric), ref.curves(metric)), metric
    assert [f.kind for f in monitor.diagnose()] == [f.kind for f in ref.diagnose()]
    assert read_tb_scalars(logger.log_dir) == read_tb_scalars(ref_logger.log_dir)  # the last step landed at the end


class Fails(PatientMLP):
    def training_step(self, batch, batch_idx):
        if self.global_step == 7:
            raise RuntimeError("a bug in the user's step")
        return super().training_step(batch, batch_idx)


def test_an_exception_lands_the_step_in_flight(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="a bug"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _monitor, _spy, _logger = _fit(tmp_path, True, monkeypatch, model=Fails(), every=2)
    scalars = read_tb_scalars(next((tmp_path / "deferred").iterdir()))
    assert [s for s, _v in scalars["health/status"]] == [0, 2, 4, 6]  # 6 was in flight when step 7 raised


def test_a_checkpoint_holds_the_step_in_flight(tmp_path, monkeypatch):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    _monitor, _spy, _logger = _fit(tmp_path, True, monkeypatch, checkpoint, steps=6, enable_checkpointing=True)
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=3.ckpt", weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("HealthMonitor")]
    steps = [s for s, _v in state["history"]["series"]["act_std"]["net.1"]]
    assert steps == [0, 1, 2]  # step 2 was still in flight when the checkpoint was taken at its batch end
