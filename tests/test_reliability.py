"""Reliability: precision, accumulation, compile, checkpointing, odd modules, NaN, resume, memory.

Each test compares the monitor's readings with a reference computed by plain torch on the same
tensors (kept by a spy in the model), or with an identical run that lacks the complication.
"""

from __future__ import annotations

import copy
import csv
import gc
import math
import pickle
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader

from lightning_health import HealthMonitor
from lightning_health.offline.patients import PatientMLP, patient_loaders
from lightning_health.readings import reductions as R
from tests.conftest import trainer_kwargs


def _fit(model: pl.LightningModule, monitor: HealthMonitor, loader: Any = None, **kw: Any) -> pl.Trainer:
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(**{"max_epochs": 1, "limit_val_batches": 0, **kw}))
    trainer.fit(model, loader if loader is not None else patient_loaders()[0])
    return trainer


def _at(monitor: HealthMonitor, metric: str, layer: str) -> dict[int, float]:
    return dict(monitor.curves(metric).get(layer, []))


class Spy(PatientMLP):
    """PatientMLP that keeps net.1's output (with its gradient) of every micro-batch, per optimizer step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: dict[int, list[torch.Tensor]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        a = self.net[1](self.net[0](x))
        a.retain_grad()
        self.seen.setdefault(self.global_step, []).append(a)
        return nn.functional.cross_entropy(self.net[2:](a).float(), y)


# -- precision -----------------------------------------------------------------------------------------
def test_sum_of_squares_of_large_half_activations_stays_finite():
    y = torch.full((4096,), 6.0e4, dtype=torch.float16)  # finite fp16; its square overflows fp16 and fp32 sums
    t = R.activation_totals(y)
    assert math.isfinite(t[R.A_SUMSQ].item()) and t[R.A_SUMSQ].item() == pytest.approx(4096 * 3.6e9)
    b = torch.full((4096,), 1e30, dtype=torch.bfloat16)  # fp32's sum of squares would be inf
    assert math.isfinite(R.activation_totals(b)[R.A_SUMSQ].item())
    assert math.isfinite(R.gradient_totals(b)[R.G_SUMSQ].item())
    assert R.derive_activation(R.activation_totals(b).tolist())["act_std"] == pytest.approx(0.0, abs=1e25)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_histograms_count_half_inputs_like_numpy(dtype):
    np = pytest.importorskip("numpy")
    x = (torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    edges = R.linear_edges(16, -4.0, 4.0)
    counts = R.histogram_counts(x, edges).tolist()
    ref, _ = np.histogram(x.float().numpy(), bins=edges.numpy())
    assert counts[1:-2] == ref.tolist()
    assert counts[0] == (x.float() < -4).sum().item() and counts[-2] == (x.float() > 4).sum().item()


def test_bf16_mixed_readings_arrive_and_match_the_bf16_tensors():
    model = Spy()
    monitor = HealthMonitor(every_n_steps=2, verbose=False)
    _fit(model, monitor, precision="bf16-mixed", max_steps=3)
    (a,) = model.seen[2]
    assert a.dtype == torch.bfloat16
    assert _at(monitor, "act_mean", "net.1")[2] == pytest.approx(a.detach().double().mean().item(), rel=1e-6)
    assert _at(monitor, "grad_norm", "net.1")[2] == pytest.approx(a.grad.double().norm().item(), rel=1e-5)


def test_lightning_turns_16_mixed_into_bf16_on_cpu():
    """Documented in docs/reliability.md: fp16 AMP through precision="16-mixed" cannot run on a CPU."""
    trainer = pl.Trainer(**trainer_kwargs(precision="16-mixed"))
    assert trainer.precision == "bf16-mixed"


class ParamNormSpy(pl.Callback):
    """The parameter-gradient norms a user sees in on_before_optimizer_step (after AMP unscaling)."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        grads = [p.grad.double() for p in pl_module.net[0].parameters()]
        self.norms[trainer.global_step] = torch.sqrt(sum(g.square().sum() for g in grads)).item()


def test_fp16_grad_scaler_readings_are_unscaled():
    """Real fp16 autocast and a real torch.amp.GradScaler on the CPU, through Lightning's own plugin."""
    model = Spy()
    monitor = HealthMonitor(every_n_steps=2, verbose=False)
    norms = ParamNormSpy()
    trainer = pl.Trainer(
        callbacks=[monitor, norms],
        plugins=[MixedPrecision("16-mixed", "cpu")],
        **trainer_kwargs(max_steps=3, limit_val_batches=0),
    )
    trainer.fit(model, patient_loaders()[0])
    scaler = trainer.precision_plugin.scaler
    assert scaler is not None and scaler.get_scale() > 1000  # gradients really were scaled
    for step in (0, 2):
        (a,) = model.seen[step]
        assert a.dtype == torch.float16
        scale = 65536.0  # the initial scale; no overflow in this run, so it never changed within 3 steps
        assert _at(monitor, "grad_norm", "net.1")[step] == pytest.approx(
            a.grad.double().norm().item() / scale, rel=1e-3
        )
        assert _at(monitor, "param_grad_norm", "net.0")[step] == pytest.approx(norms.norms[step], rel=1e-6)


# -- gradient accumulation ---------------------------------------------------------------------------------
def test_gradient_accumulation_samples_optimizer_steps_and_covers_all_micro_batches():
    model = Spy()
    monitor = HealthMonitor(every_n_steps=2, dead_window=1, verbose=False)
    _fit(model, monitor, patient_loaders(batch_size=10)[0], accumulate_grad_batches=2, max_steps=5, max_epochs=2)
    assert sorted(_at(monitor, "act_mean", "net.1")) == [0, 2, 4]  # optimizer steps, not batches
    for step in (0, 2, 4):
        micro = model.seen[step]
        assert len(micro) == 2
        act = torch.cat([a.detach() for a in micro]).double()
        grad = torch.cat([a.grad for a in micro]).double()
        assert _at(monitor, "act_mean", "net.1")[step] == pytest.approx(act.mean().item(), rel=1e-6)
        assert _at(monitor, "act_max", "net.1")[step] == pytest.approx(act.max().item(), rel=1e-6)
        assert _at(monitor, "grad_norm", "net.1")[step] == pytest.approx(grad.norm().item(), rel=1e-5)
        dead = (~(act > 0).any(0)).double().mean().item()
        assert _at(monitor, "dead_fraction", "net.1")[step] == dead


# -- torch.compile ------------------------------------------------------------------------------------------
class Tiny(pl.LightningModule):
    def __init__(self, compiled: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        self.net = torch.compile(net, backend="aot_eager") if compiled else net

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class CompileCounter(pl.Callback):
    """Dynamo's frame/graph counters after every training step."""

    def __init__(self) -> None:
        self.after: dict[int, tuple[int, int]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        from torch._dynamo.utils import counters

        self.after[trainer.global_step - 1] = (counters["frames"]["total"], counters["stats"]["unique_graphs"])


def test_compiled_model_gives_the_same_readings_and_never_recompiles():
    torch._dynamo.reset()
    eager = HealthMonitor(every_n_steps=3, dead_window=2, verbose=False)
    _fit(Tiny(compiled=False), eager, max_steps=8, max_epochs=2)
    compiled = HealthMonitor(every_n_steps=3, dead_window=2, verbose=False)
    counter = CompileCounter()
    trainer = pl.Trainer(callbacks=[compiled, counter], **trainer_kwargs(max_steps=8, limit_val_batches=0))
    trainer.fit(Tiny(compiled=True), patient_loaders()[0])
    assert sorted(counter.after) == list(range(8))
    for metric in ("act_mean", "act_std", "grad_norm", "dead_fraction"):
        for layer in ("1", "3"):
            got, want = compiled.curves(metric)[f"net._orig_mod.{layer}"], eager.curves(metric)[f"net.{layer}"]
            assert [s for s, _ in got] == [s for s, _ in want], metric
            assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-4), metric
    # Everything compiled on step 0 (sampled); no step after it, sampled (3, 6) or not, compiled anything.
    assert len({counter.after[s] for s in range(8)}) == 1, counter.after
    torch._dynamo.reset()


class _Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.a1, self.l2, self.a2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a2(self.l2(self.a1(self.l1(x))))


class FullgraphTrunk(pl.LightningModule):
    """A trunk compiled with ``fullgraph=True`` (as a submodule or in place), then an eager head."""

    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(3)
        trunk = _Trunk()  # not an nn.Sequential: torch 2.13 cannot compile its call in place with fullgraph=True
        if how == "in_place":
            trunk.compile(fullgraph=True, backend="aot_eager")
        self.trunk = torch.compile(trunk, fullgraph=True, backend="aot_eager") if how == "submodule" else trunk
        self.head = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.trunk(x)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize("how", ["submodule", "in_place", "lightning"])
def test_a_fullgraph_compiled_region_is_left_out_with_a_warning_not_a_crashed_run(how):
    """Under fullgraph=True a hook's graph break is an error: the run stopped at its first compiled call."""
    torch._dynamo.reset()
    monitor = HealthMonitor(every_n_steps=2, verbose=False)
    model: Any = FullgraphTrunk(how)
    if how == "lightning":  # the whole LightningModule, as Trainer.fit takes a compiled one
        model = torch.compile(model, fullgraph=True, backend="aot_eager")
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_steps=6, limit_val_batches=0))
    with pytest.warns(
        UserWarning,
        match=r"leaves out `trunk(._orig_mod)?.a1`, `trunk(._orig_mod)?.a2`(, `head.1`)?: compiled with torch.compile",
    ):
        trainer.fit(model, patient_loaders()[0])
    assert trainer.global_step == 6
    read = monitor.curves("act_std")
    assert all("trunk" not in name for name in read)
    if how != "lightning":  # the eager head is still read, at every sampled step
        assert [s for s, _ in read["head.1"]] == [0, 2, 4]
    torch._dynamo.reset()


# -- activation checkpointing and shared modules ---------------------------------------------------------
class Blocks(pl.LightningModule):
    """Two Linear+ReLU blocks; optionally checkpointed, optionally one shared ReLU used after every Linear."""

    def __init__(self, ckpt: str | None = None, shared: bool = False) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.ckpt, self.shared = ckpt, shared
        self.l1, self.l2, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.a1, self.a2 = nn.ReLU(), nn.ReLU()
        self.seen: list[torch.Tensor] = []

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.a1(self.l1(x))
        return (self.a1 if self.shared else self.a2)(self.l2(h1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        x = x.requires_grad_()  # reentrant checkpointing gives the block's weights no gradient otherwise
        if self.ckpt is not None:
            return nn.functional.cross_entropy(
                self.head(checkpoint(self._block, x, use_reentrant=self.ckpt == "reentrant")), y
            )
        h = self._block(x)
        return nn.functional.cross_entropy(self.head(h), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


METRICS = ("act_mean", "act_std", "act_max", "zero_fraction", "grad_std", "grad_norm", "dead_fraction")


def _curves(monitor: HealthMonitor) -> dict[str, Any]:
    return {m: monitor.curves(m) for m in METRICS}


@pytest.mark.parametrize("ckpt", ["reentrant", "non_reentrant"])
def test_activation_checkpointing_does_not_double_count(ckpt):
    plain, checked = HealthMonitor(every_n_steps=2, verbose=False), HealthMonitor(every_n_steps=2, verbose=False)
    _fit(Blocks(), plain, max_steps=9, max_epochs=2)
    _fit(Blocks(ckpt=ckpt), checked, max_steps=9, max_epochs=2)
    want, got = _curves(plain), _curves(checked)
    assert got.keys() == want.keys()
    for metric in METRICS:
        for layer, points in want[metric].items():
            assert [s for s, _ in got[metric][layer]] == [s for s, _ in points], (metric, layer)
            assert [v for _, v in got[metric][layer]] == pytest.approx([v for _, v in points], rel=1e-6), metric


def test_a_module_called_twice_per_forward_reads_both_calls_once():
    """The shared ReLU's readings equal those of the two separate ReLUs taken together."""
    two, shared = HealthMonitor(every_n_steps=2, verbose=False), HealthMonitor(every_n_steps=2, verbose=False)
    _fit(Blocks(), two, max_steps=9, max_epochs=2)
    _fit(Blocks(shared=True), shared, max_steps=9, max_epochs=2)
    assert len(shared.curves("dead_fraction")["a1"]) == 2  # steps 6 and 8: the window of 4 is full
    assert set(shared.curves("act_mean")) == {"a1"}  # a2 is never called
    for step, _ in shared.curves("act_mean")["a1"]:
        a1 = {m: _at(two, m, "a1")[step] for m in ("act_mean", "act_max", "grad_norm")}
        a2 = {m: _at(two, m, "a2")[step] for m in ("act_mean", "act_max", "grad_norm")}
        assert _at(shared, "act_mean", "a1")[step] == pytest.approx((a1["act_mean"] + a2["act_mean"]) / 2)
        assert _at(shared, "act_max", "a1")[step] == pytest.approx(max(a1["act_max"], a2["act_max"]))
        assert _at(shared, "grad_norm", "a1")[step] == pytest.approx(math.hypot(a1["grad_norm"], a2["grad_norm"]))
    for step, value in shared.curves("dead_fraction")["a1"]:  # 16 + 16 units, one fire mask per call
        assert value == pytest.approx(
            (_at(two, "dead_fraction", "a1")[step] + _at(two, "dead_fraction", "a2")[step]) / 2
        )


# -- odd outputs, frozen layers, no gradient, empty batches, manual optimization ---------------------------
class TupleBlock(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.lin = kind, nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> Any:
        h = torch.relu(self.lin(x))
        if self.kind == "tuple":
            return h, torch.arange(3)
        if self.kind == "dict":
            return {"hidden": h, "ids": torch.arange(3)}
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=h)


class BlockModel(pl.LightningModule):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.block, self.head = TupleBlock(kind), nn.Linear(16, 4)
        self.seen: dict[int, torch.Tensor] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.block(x)
        if self.block.kind == "model_output":
            h = out.last_hidden_state
        else:
            h = out[0] if isinstance(out, tuple) else out["hidden"]
        h.retain_grad()
        self.seen[self.global_step] = h
        return nn.functional.cross_entropy(self.head(h), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize("kind", ["tuple", "dict", "model_output"])
def test_whole_blocks_with_structured_outputs_are_read(kind):
    if kind == "model_output":
        pytest.importorskip("transformers")
    model = BlockModel(kind)
    monitor = HealthMonitor(every_n_steps=2, layers=["block"], verbose=False)
    _fit(model, monitor, max_steps=3)
    h = model.seen[2]
    assert _at(monitor, "act_mean", "block")[2] == pytest.approx(h.detach().mean().item(), rel=1e-6)
    assert _at(monitor, "grad_norm", "block")[2] == pytest.approx(h.grad.norm().item(), rel=1e-5)


class Partial(pl.LightningModule):
    """A frozen first layer, a branch that gets no gradient, and (optionally) an empty batch."""

    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = not manual
        self.frozen, self.act0 = nn.Linear(8, 16), nn.ReLU()
        self.frozen.requires_grad_(False)
        self.lin, self.act1, self.head = nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
        self.side = nn.Tanh()  # computed, never used by the loss: it gets no gradient

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        if self.global_step == 2:  # a zero-size batch
            x, y = x[:0], y[:0]
        h = self.act0(self.frozen(x))
        self.side(h)
        loss = self.head(self.act1(self.lin(h))).square().sum() / max(len(y), 1)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.01)


@pytest.mark.parametrize("manual", [False, True])
def test_frozen_layers_ungraded_branches_empty_batches_and_manual_optimization(manual):
    monitor = HealthMonitor(every_n_steps=1, dead_window=1, verbose=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lightning_health stopped.*")  # no hook may have failed
        _fit(Partial(manual), monitor, max_steps=5, max_epochs=2)
    assert sorted(monitor.curves("act_mean")) == ["act0", "act1", "side"]
    steps = [0, 1, 3, 4]  # step 2's batch was empty: nothing to read, nothing logged, no crash
    assert sorted(_at(monitor, "act_mean", "act1")) == steps
    assert sorted(_at(monitor, "grad_norm", "act1")) == steps
    assert sorted(_at(monitor, "act_mean", "side")) == steps
    assert all(v < 1.0 for _, v in monitor.curves("dead_fraction")["act1"])  # the empty batch is no evidence
    assert "side" not in monitor.curves("grad_norm")  # no gradient reaches it
    assert "act0" not in monitor.curves("grad_norm")  # frozen input side: its output needs no gradient
    assert "frozen" not in monitor.curves("param_grad_norm") and "lin" in monitor.curves("param_grad_norm")


def test_inplace_relu_in_a_checkpointed_shared_block_matches_out_of_place():
    def run(inplace: bool) -> dict[str, Any]:
        model = Blocks(ckpt="non_reentrant", shared=True)
        model.a1 = nn.ReLU(inplace=inplace)
        monitor = HealthMonitor(every_n_steps=1, verbose=False)
        _fit(model, monitor, max_steps=6, max_epochs=2)
        return _curves(monitor)

    assert run(True) == run(False)


# -- NaN / Inf ---------------------------------------------------------------------------------------------
class GoesNaN(PatientMLP):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step == 3:
            x = x.clone()
            x[0, 0] = float("inf")
        return nn.functional.cross_entropy(self(x), y)


def test_nonfinite_finding_with_its_onset_and_loggers_survive(tmp_path):
    from tests.conftest import read_tb_scalars

    monitor = HealthMonitor(every_n_steps=1, verbose=False)
    tb, csv_logger = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(GoesNaN(), monitor, max_steps=6, max_epochs=2, logger=[tb, csv_logger])
    assert trainer.global_step == 6  # the run went on (on_critical="warn")
    assert not [w for w in caught if "stopped writing" in str(w.message)]  # no sink was disabled
    nonfinite = [f for f in monitor.diagnose() if f.kind == "nonfinite"]
    assert nonfinite and {f.step for f in nonfinite} == {3} and all(f.severity == "critical" for f in nonfinite)
    scalars = read_tb_scalars(tb.log_dir)
    assert dict(scalars["health/nonfinite/net.1"])[3] > 0
    assert [s for s, _ in scalars["health/act_mean/net.1"]] == list(range(6))
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("health/nonfinite/net.1")]
    assert float(next(r for r in rows if r["step"] == "3")["health/nonfinite/net.1"]) > 0


# -- state, memory, pickling -------------------------------------------------------------------------------
def test_resume_from_a_model_checkpoint_saved_mid_fit_continues_the_same_curves(tmp_path):
    train, _ = patient_loaders()
    fixed = DataLoader(train.dataset, batch_size=16)  # unshuffled: both runs see the same batches
    full = HealthMonitor(every_n_steps=2, verbose=False)
    _fit(PatientMLP(), full, fixed, max_epochs=2)
    first = HealthMonitor(every_n_steps=2, verbose=False)
    # saved by ModelCheckpoint at the end of epoch 0 of 2 (step 5). A mid-epoch checkpoint resumes too, but
    # Lightning then restarts the epoch's data from its first batch (unless the loader is stateful), so the
    # readings after it are of other batches than an uninterrupted run's: not a monitor matter.
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{step}")
    pl.Trainer(
        callbacks=[first, saver], **trainer_kwargs(max_epochs=2, limit_val_batches=0, enable_checkpointing=True)
    ).fit(PatientMLP(), fixed)
    ckpt = tmp_path / "step=5.ckpt"
    assert ckpt.exists()
    resumed = HealthMonitor(every_n_steps=2, verbose=False)
    pl.Trainer(callbacks=[resumed], **trainer_kwargs(max_epochs=2, limit_val_batches=0)).fit(
        PatientMLP(), fixed, ckpt_path=ckpt
    )
    for metric in ("act_std", "grad_norm", "dead_fraction", "param_grad_norm"):
        for layer, points in full.curves(metric).items():
            got = resumed.curves(metric)[layer]
            assert [s for s, _ in got] == [s for s, _ in points], (metric, layer)
            assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), (metric, layer)


def test_a_thousand_sampled_steps_do_not_grow_memory():
    """The callback's own hooks, driven in Lightning's order by a plain loop (a Trainer would take minutes
    under tracemalloc): every step sampled, 1000 steps, history capped by ``max_points``."""
    from types import SimpleNamespace

    model = PatientMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 8), torch.arange(8) % 4
    monitor = HealthMonitor(every_n_steps=1, max_points=64, verbose=False)
    trainer = SimpleNamespace(global_step=0, loggers=[], is_global_zero=True, should_stop=False, sanity_checking=False)
    monitor.setup(trainer, model, "fit")

    def step() -> None:
        monitor.on_train_batch_start(trainer, model, (x, y), 0)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        monitor.on_before_optimizer_step(trainer, model, opt)
        opt.step()
        opt.zero_grad()
        trainer.global_step += 1
        monitor.on_train_batch_end(trainer, model, loss, (x, y), 0)

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add contention
    try:
        for _ in range(300):
            step()
        tensors_before = live_tensors()
        tracemalloc.start()
        for _ in range(700):
            step()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        torch.set_num_threads(threads)
    assert trainer.global_step == 1000
    # The history may legitimately refill up to its cap (a (step, value) tuple is ~72 bytes) between two
    # thinnings; anything beyond that, plus a small slack, is a leak.
    series = sum(len(monitor.curves(metric)) for metric in monitor._history.metrics())
    budget = 256 * 1024 + 64 * 72 * series
    assert grown < budget, f"{grown} bytes allocated and kept over 700 sampled steps ({series} series)"
    assert live_tensors() <= tensors_before
    assert max(len(p) for p in monitor.curves("act_mean").values()) <= 64
    assert all(len(m._forward_hooks) == 1 for m in model.net if isinstance(m, nn.ReLU))  # never re-added
    monitor.teardown(trainer, model, "fit")
    assert all(not m._forward_hooks for m in model.modules())


def test_the_model_deep_copies_and_pickles_mid_fit_and_after():
    copies: list[Any] = []

    class Copier(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
            if trainer.global_step == 2:
                copies.append(copy.deepcopy(pl_module))
                copies.append(pickle.loads(pickle.dumps(pl_module)))

    model = PatientMLP()
    monitor = HealthMonitor(every_n_steps=1, verbose=False)
    pl.Trainer(callbacks=[monitor, Copier()], **trainer_kwargs(max_steps=4, max_epochs=1, limit_val_batches=0)).fit(
        model, patient_loaders()[0]
    )
    before = monitor.curves("act_mean")
    for clone in copies:  # a copy made mid-fit must not feed the monitor when it runs
        clone(torch.randn(4, 8)).sum().backward()
    assert monitor.curves("act_mean") == before
    pickle.loads(pickle.dumps(copy.deepcopy(model)))
    pickle.loads(pickle.dumps(monitor))


# -- sharded strategies -----------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_sharded_strategies_warn_at_setup_and_stay_idle(strategy):
    from types import SimpleNamespace

    trainer = SimpleNamespace(strategy=type(strategy, (), {})(), loggers=[], is_global_zero=True, global_step=0)
    model = PatientMLP()
    monitor = HealthMonitor(every_n_steps=1, verbose=False)
    with pytest.warns(RuntimeWarning, match=f"does not support {strategy}.*docs/distributed.md"):
        monitor.setup(trainer, model, "fit")
    assert monitor.monitored_layers == [] and not any(m._forward_hooks for m in model.modules())
    monitor.on_train_batch_start(trainer, model, None, 0)  # idle: no error, nothing armed
    model(torch.randn(2, 8))
    assert monitor.curves("act_mean") == {}


def test_an_amp_overflow_step_is_not_a_critical_finding():
    """A GradScaler whose scale is too large overflows and skips steps by design: no false alarm."""
    from lightning_health.offline.patients import PatientMLP

    monitor = HealthMonitor(every_n_steps=1, verbose=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16 gradients overflow for several steps
    trainer = pl.Trainer(
        callbacks=[monitor],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        **trainer_kwargs(max_steps=4, limit_val_batches=0),
    )
    trainer.fit(PatientMLP(), patient_loaders()[0])
    assert scaler.get_scale() < 2.0**40  # the scaler really did find inf and back off
    nonfinite_grads = [v for pts in monitor.curves("grad_nonfinite").values() for _, v in pts]
    assert max(nonfinite_grads) > 0  # the gradients really were infinite, and are still logged
    assert not [f for f in monitor.diagnose() if f.kind in ("nonfinite", "exploding_gradient")]
