"""HealthMonitor end to end in real Trainer runs, with real loggers read back from disk."""

from __future__ import annotations

import csv
import inspect
import os
import pickle
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from lightning_health import HealthCriticalError, HealthMonitor
from lightning_health.offline.patients import PatientMLP, patient_loaders
from tests.conftest import trainer_kwargs

METRICS = (
    "act_mean", "act_std", "act_min", "act_max", "zero_fraction", "saturation", "nonfinite",
    "grad_std", "grad_max", "grad_norm", "dead_fraction",
)  # fmt: skip


def _fit(model, monitor, tmp_path=None, loggers=False, epochs=2, **kw):
    train, val = patient_loaders()
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=epochs, logger=loggers, **kw))
    trainer.fit(model, train, val)
    return trainer


@pytest.mark.parametrize("value,exc", [(0, ValueError), (-3, ValueError), (1.5, TypeError), ("50", TypeError),
                                       (True, TypeError)])  # fmt: skip
def test_every_n_steps_is_validated_by_name(value, exc):
    with pytest.raises(exc, match="every_n_steps"):
        HealthMonitor(every_n_steps=value)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"on_critical": "explode"}, "on_critical"),
        ({"dead_window": 0}, "dead_window"),
        ({"histogram_bins": 7}, "histogram_bins"),
        ({"thresholds": {"dead_warning": 0.1}}, "thresholds"),
        ({"neuron_dim": "last"}, "neuron_dim"),
        ({"saturation_margin": 0.9}, "saturation_margin"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        HealthMonitor(**kwargs)


def test_scalars_are_logged_at_exactly_the_sampled_steps(tmp_path, tb_scalars):
    monitor = HealthMonitor(every_n_steps=3, dead_window=2, verbose=False)
    tb = TensorBoardLogger(tmp_path, name="tb")
    csv_logger = CSVLogger(tmp_path, name="csv")
    _fit(PatientMLP(), monitor, loggers=[tb, csv_logger], epochs=2)  # 5 batches/epoch -> steps 0..9
    scalars = tb_scalars(tb.log_dir)
    for metric in METRICS:
        for layer in ("net.1", "net.3", "net.5", "net.7"):
            steps = [s for s, _ in scalars[f"health/{metric}/{layer}"]]
            # dead_fraction needs a full window (2 sampled batches) before its first reading
            assert steps == ([3, 6, 9] if metric == "dead_fraction" else [0, 3, 6, 9]), (metric, layer)
    assert [s for s, _ in scalars["health/val_dead_fraction/net.1"]] == [5, 10]
    assert "health/param_grad_norm/net.0" in scalars
    # The same numbers through the CSV logger, and in monitor.curves()
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    csv_steps = sorted({int(r["step"]) for r in rows if r.get("health/act_std/net.3")})
    assert csv_steps == [0, 3, 6, 9]
    curve = monitor.curves("act_std")["net.3"]
    assert [s for s, _ in curve] == [0, 3, 6, 9]
    tb_values = [v for _, v in scalars["health/act_std/net.3"]]
    np.testing.assert_allclose([v for _, v in curve], tb_values, rtol=1e-6)


def test_readings_equal_a_direct_computation_on_the_sampled_batch():
    """act/grad readings of one sampled step equal torch's own numbers on the same tensors."""
    seen = {}

    class Spy(PatientMLP):
        def training_step(self, batch, batch_idx):
            x, y = batch
            h = self.net[0](x)
            a = self.net[1](h)
            a.retain_grad()
            out = self.net[2:](a)
            loss = nn.functional.cross_entropy(out, y)
            seen[self.global_step] = (a, loss)
            return loss

    monitor = HealthMonitor(every_n_steps=2, verbose=False)
    _fit(Spy(), monitor, epochs=1, limit_val_batches=0)
    a, _ = seen[2]
    ref = a.detach()
    assert dict(monitor.curves("act_mean")["net.1"])[2] == pytest.approx(ref.mean().item(), rel=1e-6)
    assert dict(monitor.curves("act_std")["net.1"])[2] == pytest.approx(ref.std().item(), rel=1e-5)
    assert dict(monitor.curves("zero_fraction")["net.1"])[2] == pytest.approx((ref == 0).float().mean().item())
    g = a.grad
    assert dict(monitor.curves("grad_std")["net.1"])[2] == pytest.approx(g.std().item(), rel=1e-5)
    assert dict(monitor.curves("grad_norm")["net.1"])[2] == pytest.approx(g.norm().item(), rel=1e-5)
    assert dict(monitor.curves("grad_max")["net.1"])[2] == pytest.approx(g.abs().max().item(), rel=1e-6)


def test_two_patients_are_told_apart():
    healthy = HealthMonitor(every_n_steps=5, verbose=False)
    _fit(PatientMLP("kaiming", 0.05), healthy, epochs=30)
    sick = HealthMonitor(every_n_steps=5, verbose=False)
    _fit(PatientMLP("normal", 0.8), sick, epochs=30)
    assert not [f for f in healthy.diagnose() if f.severity == "critical"]
    critical = [f for f in sick.diagnose() if f.severity == "critical"]
    assert critical
    assert {f.layer for f in critical} >= {"net.3", "net.5", "net.7"}
    assert all(f.hint and f.message for f in critical)


def test_val_dead_fraction_equals_an_independent_reference_on_final_weights():
    model = PatientMLP("kaiming", 0.5)  # finite, with 12-31% dead units per layer after 3 epochs
    monitor = HealthMonitor(every_n_steps=1, verbose=False)
    train, val = patient_loaders()
    pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=3)).fit(model, train, val)
    # Reference: plain PyTorch, final weights, whole validation set, OR over every example.
    fired = {}
    with torch.no_grad():
        for x, _ in val:
            h = x
            for i, module in enumerate(model.net):
                h = module(h)
                if isinstance(module, nn.ReLU):
                    f = (h > 0).any(0)
                    fired[f"net.{i}"] = fired.get(f"net.{i}", torch.zeros_like(f)) | f
    dead = {name: (~f).float().mean().item() for name, f in fired.items()}
    assert sum(dead.values()) > 0.3  # the comparison is not trivially all-zero
    for name, expected in dead.items():
        assert monitor.curves("val_dead_fraction")[name][-1][1] == expected


@pytest.mark.parametrize("path", ["device", "host-bounds"])
def test_one_host_transfer_per_sampled_step_and_none_between(monkeypatch, path):
    """The device path (every accelerator tensor takes it) reads nothing on the host but the one ``tolist``.

    CPU tensors take the host-bounds path: there a scalar read waits for no device, and each
    tensor's two bounds are read (in ``readings/fused.py`` only, nowhere else) to skip passes.
    """
    import lightning_health
    from lightning_health.readings import reductions

    package_dir = str(Path(lightning_health.__file__).parent)
    calls: list[tuple[str, int]] = []
    step = {"now": None}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = inspect.stack()[1].filename
            if caller.startswith(package_dir) and not (path == "host-bounds" and caller.endswith("fused.py")):
                calls.append((name, step["now"]))
            return original(self, *args, **kwargs)

        return wrapper

    class StepTracker(pl.Callback):
        """Placed after the monitor: its batch window encloses the monitor's whole step."""

        def on_train_batch_start(self, trainer, *args):
            step["now"] = trainer.global_step

        def on_train_batch_end(self, trainer, *args):
            step["now"] = None

    if path == "device":
        monkeypatch.setattr(reductions, "reads_bounds", lambda x: False)
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    monitor = HealthMonitor(every_n_steps=4, verbose=False)
    train, _ = patient_loaders()
    trainer = pl.Trainer(callbacks=[monitor, StepTracker()], **trainer_kwargs(max_steps=10))
    trainer.fit(PatientMLP(), train)
    per_step = {}
    for name, s in calls:
        if s is not None:  # inside a training batch, from forward to the end of the monitor's step
            per_step.setdefault(s, []).append(name)
    assert per_step == {0: ["tolist"], 4: ["tolist"], 8: ["tolist"]}


_WAITS_ON_CUDA = (
    "aten._local_scalar_dense", "aten.nonzero", "aten.bincount", "aten.masked_select", "aten.unique",
    "aten._unique", "aten.repeat_interleave", "aten.equal", "aten.is_nonzero", "aten.histc",
)  # fmt: skip
"""Ops whose CUDA kernels read a value back to the host (an output size, a bool): each a blocking sync."""


@pytest.mark.parametrize("workload", ["cnn", "gpt2"])
def test_the_device_path_calls_no_op_that_waits_on_cuda(monkeypatch, workload):
    """The GPU check found CUDA's bincount syncing once per histogram; this catches such an op on a CPU.
    The reductions are forced onto their device path; every op of the monitor's sampled steps is seen
    by a dispatch mode. One branch may read: collapse's per-position moments, taken for CPU tensors
    only (``unit_moments`` sends other devices to the branch-free shifted sums)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from benchmarks.gpu_check import workload as build
    from lightning_health.readings import reductions

    monkeypatch.setattr(reductions, "reads_bounds", lambda x: False)
    seen: list[tuple[str, str]] = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func).startswith(_WAITS_ON_CUDA):
                frame = inspect.currentframe()
                while frame is not None and f"{os.sep}lightning_health{os.sep}" not in frame.f_code.co_filename:
                    frame = frame.f_back
                if frame is not None:
                    seen.append((str(func), f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"))
            return func(*args, **(kwargs or {}))

    mode = Ops()

    class Watch(pl.Callback):
        """Before the monitor at a batch's start, after it at its end: the step end is watched too."""

        def on_train_batch_start(self, trainer, *args):
            mode.__enter__()

    class Unwatch(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            mode.__exit__(None, None, None)

    module, loader, _precision = build(workload, small=True, steps=4)
    monitor = HealthMonitor(every_n_steps=1, verbose=False)
    trainer = pl.Trainer(callbacks=[Watch(), monitor, Unwatch()], **trainer_kwargs(max_steps=4))
    trainer.fit(module, loader)
    assert monitor.curves("act_mean"), "nothing was read"
    assert {where for _op, where in seen} <= {"collapse.py:_position_moments"}, seen


def test_plain_steps_hold_no_buffers_of_the_sampled_ones():
    """The reductions' scratch and the update ratio's copies serve consecutive sampled steps; once a
    plain step starts they are dropped, so at the default cadence plain steps hold no extra memory."""
    held: dict[int, tuple[int, int]] = {}

    class Probe(pl.Callback):
        """After the monitor: what it holds during each step, after its forward and backward pass."""

        def on_before_optimizer_step(self, trainer, *args):
            runtime = monitor._runtime
            scratch = sum(t.numel() for t in runtime.capture.scratch._buffers.values())
            held[trainer.global_step] = (scratch, len(runtime.updates._spare))

    monitor = HealthMonitor(every_n_steps=3, verbose=False)
    train, _ = patient_loaders()
    trainer = pl.Trainer(callbacks=[monitor, Probe()], **trainer_kwargs(max_steps=8))
    trainer.fit(PatientMLP(), train)
    for step, (scratch, spare) in held.items():
        if step % 3:
            assert (scratch, spare) == (0, 0), step  # a plain step
        else:
            assert scratch > 0, step  # a sampled step: its passes wrote into the scratch
    assert set(held) == set(range(8))


def test_hooks_are_removed_and_the_model_pickles_after_fit():
    model = PatientMLP()
    monitor = HealthMonitor(every_n_steps=2, verbose=False)
    _fit(model, monitor, epochs=1)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    pickle.loads(pickle.dumps(model))
    restored = pickle.loads(pickle.dumps(monitor))  # ddp_spawn pickles callbacks
    assert restored.curves("act_std") == monitor.curves("act_std")


def test_hooks_are_removed_when_training_raises():
    class Boom(PatientMLP):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    model = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        _fit(model, HealthMonitor(every_n_steps=1, verbose=False), epochs=1)
    assert all(not m._forward_hooks for m in model.modules())


def test_sanity_check_and_validation_do_not_produce_training_readings():
    monitor = HealthMonitor(every_n_steps=1000, verbose=False)
    _fit(PatientMLP(), monitor, epochs=1, num_sanity_val_steps=2)
    assert [s for s, _ in monitor.curves("act_mean")["net.1"]] == [0]
    # the sanity check is partial: no val_dead_fraction from it; one from the real pass at step 5
    assert [s for s, _ in monitor.curves("val_dead_fraction")["net.1"]] == [5]


def test_inplace_relu_gives_exactly_the_same_readings():
    def run(inplace):
        model = PatientMLP()
        for i, m in enumerate(model.net):
            if isinstance(m, nn.ReLU):
                model.net[i] = nn.ReLU(inplace=inplace)
        monitor = HealthMonitor(every_n_steps=1, verbose=False)
        _fit(model, monitor, epochs=1, limit_val_batches=0)
        return {m: monitor.curves(m) for m in ("act_mean", "act_std", "grad_std", "grad_norm", "zero_fraction")}

    assert run(True) == run(False)


def test_stop_and_raise_on_critical():
    monitor = HealthMonitor(every_n_steps=1, on_critical="stop", verbose=False)
    trainer = _fit(PatientMLP("normal", 0.8), monitor, epochs=30)
    assert trainer.global_step < 150  # stopped early
    assert any(f.severity == "critical" for f in monitor.diagnose())
    with pytest.raises(HealthCriticalError, match="critical"):
        _fit(PatientMLP("normal", 0.8), HealthMonitor(every_n_steps=1, on_critical="raise", verbose=False), epochs=30)


def test_console_chart_at_end_of_fit(capsys):
    _fit(PatientMLP("normal", 0.8), HealthMonitor(every_n_steps=5), epochs=5)
    out = capsys.readouterr().out
    assert "per-layer health" in out and "net.3" in out and "hint:" in out and "critical" in out


def test_standalone_pytorch_lightning_trainer_accepts_the_callback():
    pytorch_lightning = pytest.importorskip("pytorch_lightning")

    class PLModel(pytorch_lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monitor = HealthMonitor(every_n_steps=2, verbose=False)
    train, _ = patient_loaders()
    trainer = pytorch_lightning.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=1))
    trainer.fit(PLModel(), train)
    assert [s for s, _ in monitor.curves("act_std")["net.1"]] == [0, 2, 4]


def test_checkpoint_resume_continues_the_same_curves(tmp_path):
    train, val = patient_loaders()
    monitor = HealthMonitor(every_n_steps=2, verbose=False)
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=1, default_root_dir=tmp_path))
    model = PatientMLP()
    trainer.fit(model, train, val)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = HealthMonitor(every_n_steps=2, verbose=False)
    pl.Trainer(callbacks=[resumed], **trainer_kwargs(max_epochs=2, default_root_dir=tmp_path)).fit(
        PatientMLP(), train, val, ckpt_path=ckpt
    )
    steps = [s for s, _ in resumed.curves("act_std")["net.1"]]
    assert steps == [0, 2, 4, 6, 8]
    # the dead window carried over: a reading at step 6 needs 4 sampled batches (0, 2, 4, 6)
    assert [s for s, _ in resumed.curves("dead_fraction")["net.1"]] == [6, 8]


def test_chart_marks_nan_layers_instead_of_calling_them_alive(capsys):
    monitor = HealthMonitor(every_n_steps=1, burst_steps=0)
    _fit(PatientMLP("normal", 0.8), monitor, epochs=2)
    rows = {row.layer: row.cells() for row in monitor.report().rows}
    assert rows["net.3"][1] == "nan" and rows["net.3"][5] == "nan"


def test_param_grad_norm_equals_the_norm_of_each_modules_gradients():
    seen = {}

    class Grab(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen[trainer.global_step] = {
                f"net.{i}": torch.cat([p.grad.flatten() for p in m.parameters()]).norm().item()
                for i, m in enumerate(pl_module.net)
                if isinstance(m, nn.Linear)
            }

    monitor = HealthMonitor(every_n_steps=2, verbose=False)
    train, _ = patient_loaders()
    pl.Trainer(callbacks=[Grab(), monitor], **trainer_kwargs(max_steps=5)).fit(PatientMLP(), train)
    curves = monitor.curves("param_grad_norm")
    assert set(curves) == {"net.0", "net.2", "net.4", "net.6", "net.8"}
    for layer, points in curves.items():
        for step, value in points:
            assert value == pytest.approx(seen[step][layer], rel=1e-6)
