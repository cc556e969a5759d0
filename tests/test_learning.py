"""Is each layer learning? update_ratio, param_norm, the depth profile and their rules, in real fits.

Every reference is computed by the test itself from the model's tensors (a callback placed after the
monitor reads the weights and gradients with plain torch), never from the monitor's numbers.
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from benchmarks.workloads import MLP, make_workload
from lightning_health import HealthMonitor, Thresholds
from lightning_health.cli import main
from lightning_health.diagnosis.learning import UpdateWindow, depth_profile
from lightning_health.diagnosis.replay import GRADIENT_READINGS
from lightning_health.monitor.record import GRADIENT_READINGS as LIVE_GRADIENT_READINGS
from lightning_health.offline.event_reader import read_run
from lightning_health.offline.patients import PatientMLP, patient_loaders
from lightning_health.pipeline.learning import UpdateTracker
from lightning_health.readings.update import tensor_squares, update_ratio
from tests.conftest import trainer_kwargs

MODULES = ("net.0", "net.2", "net.4", "net.6", "net.8")


class WeightSpy(pl.Callback):
    """After the monitor: per step, each Linear's weights before the update, its gradient, and weights after."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.grads: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.after: dict[int, dict[str, list[torch.Tensor]]] = {}

    @staticmethod
    def _params(pl_module):
        return {n: list(m.parameters(recurse=False)) for n, m in pl_module.named_modules() if n in MODULES}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = self._params(pl_module)
        self.before[trainer.global_step] = {n: [p.detach().clone() for p in ps] for n, ps in params.items()}
        self.grads[trainer.global_step] = {
            n: [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in ps]
            for n, ps in params.items()
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.after[step] = {n: [p.detach().clone() for p in ps] for n, ps in self._params(pl_module).items()}

    def ratio(self, step: int, name: str) -> float:
        before, after = self.before[step][name], self.after[step][name]
        delta = torch.cat([(a - b).double().reshape(-1) for a, b in zip(after, before)]).norm()
        return (delta / torch.cat([b.double().reshape(-1) for b in before]).norm()).item()


def _fit(model, monitor, *, steps=8, loggers=False, spy=None, **kw):
    callbacks = [monitor] + ([spy] if spy is not None else [])
    trainer = pl.Trainer(
        callbacks=callbacks, **trainer_kwargs(max_steps=steps, limit_val_batches=0, logger=loggers, **kw)
    )
    trainer.fit(model, patient_loaders()[0])
    return trainer


def _at(monitor, metric, name, step):
    return dict(monitor.curves(metric)[name])[step]


# -- pure functions --------------------------------------------------------------------------------------
def test_update_ratio_is_zero_without_a_move_and_undefined_for_zero_weights():
    out = update_ratio(torch.tensor([0.0, 2e-3, 1.0, 0.0]), torch.tensor([3.0, 2.0, 0.0, 0.0], dtype=torch.float64))
    assert out[0] == 0 and out[1] == pytest.approx(1e-3) and torch.isnan(out[2]) and out[3] == 0


def test_weight_and_gradient_squares_match_float64_on_large_and_half_tensors():
    """Param norms, gradient norms and update norms: one float32 norm over a 16M-value tensor drifted
    1e-3 from float64, and a bfloat16 tensor's norm came back in bfloat16 (3 digits)."""
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.rand(1 << 24, generator=g),
        torch.randn(1000, 1001, generator=g) + 3,
        torch.randn(70_000, generator=g).bfloat16(),
        torch.randn(50, generator=g).bfloat16(),
        torch.randn(7, generator=g),
    ]
    reference = np.array([np.square(t.double().numpy()).sum() for t in tensors])
    got = tensor_squares(tensors).numpy()
    np.testing.assert_allclose(got, reference, rtol=1e-6)
    wide = [torch.randn(70_000, generator=g, dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64)]
    got = tensor_squares(wide).numpy()  # a float64 model's norms are not rounded through float32
    np.testing.assert_allclose(got, [np.square(t.numpy()).sum() for t in wide], rtol=1e-12)


def test_depth_profile_gains_follow_the_signal():
    snap = {"a": {"act_rms": 1.0, "grad_norm": 4.0}, "b": {"act_rms": 3.0, "grad_norm": 2.0}, "c": {"act_rms": 6.0}}
    profile = depth_profile(["a", "b", "c"], snap)
    assert profile["b"]["act_gain"] == 3.0 and profile["b"]["grad_gain"] == 2.0  # backward: a's grad over b's
    assert "grad_gain" not in profile["c"] and profile["c"]["act_gain"] == 2.0 and "act_gain" not in profile["a"]


def test_update_window_skips_amp_steps_and_modules_without_gradient():
    window = UpdateWindow(2)
    ok = {"update_ratio": 1e-3, "param_grad_norm": 1.0}
    window.add({"a": ok, "b": {"update_ratio": 0.0, "param_grad_norm": 1.0}})
    skipped = window.add({"a": {"update_ratio": 0.0, "param_grad_norm": 1.0}, "b": ok}, skipped=True)
    assert skipped == {}
    stats = window.add({"a": ok, "b": {"update_ratio": 0.0, "param_grad_norm": 0.0}})
    assert stats["a"]["update_ratio_min"] == 1e-3 and stats["a"]["update_ratio_full"] == 1.0
    assert "b" not in stats  # no gradient reached it: forgotten, not judged


def test_the_byte_budget_rotates_the_modules_and_bounds_the_copy():
    model = PatientMLP()
    groups = [(n, list(m.parameters(recurse=False))) for n, m in model.named_modules() if n in MODULES]
    sizes = [sum(p.numel() * 4 for p in ps) for _n, ps in groups]  # 288, 1088, 1088, 1088, 272 bytes
    tracker = UpdateTracker(groups, max_bytes=1400)
    seen: list[int] = []
    for _ in range(4):
        tracker.before_step()
        vector, read = tracker.after_step()
        assert vector is not None and sum(sizes[i] for i in read) <= 1400
        seen += read
    assert set(seen) == set(range(len(groups))) and tracker.peak_bytes <= 1400
    assert UpdateTracker(groups, max_bytes=1000).too_large == ["net.2", "net.4", "net.6"]


def _moved_weight(rows: int, cols: int, seed: int = 0) -> tuple[list[tuple[str, list[nn.Parameter]]], torch.Tensor]:
    """A weight and an update whose rows differ in scale by up to 1000x, as a layer's gradient rows do."""
    g = torch.Generator().manual_seed(seed)
    weight = nn.Parameter(torch.randn(rows, cols, generator=g))
    scales = torch.logspace(-3, 0, rows)[torch.randperm(rows, generator=g)].reshape(-1, 1)
    return [("w", [weight])], 1e-3 * scales * torch.randn(rows, cols, generator=g)


@pytest.mark.parametrize("shape", [(300, 999), (4, 1537)])  # runs of 73 or 74 blocks; of 1 or 2
def test_a_sampled_copy_estimates_the_update_without_bias_and_holds_only_the_sample(shape):
    """A parameter larger than the sample is copied on a stratified sample of blocks; the reference is the
    float64 norm of the whole update, computed here. Both shapes end in a tail of 4 values."""
    groups, delta = _moved_weight(*shape)
    weight = groups[0][1][0]
    exact = (delta.double().norm() / weight.detach().double().norm()).item()
    tracker = UpdateTracker(groups, max_bytes=None, sample=4096)
    user_stream = torch.get_rng_state()
    estimates = []
    for _ in range(200):
        tracker.before_step()
        with torch.no_grad():
            weight.add_(delta)
        vector, _read = tracker.after_step()
        with torch.no_grad():
            weight.sub_(delta)
        estimates.append(vector[1].item())
    assert torch.equal(torch.get_rng_state(), user_stream)  # the monitor draws from a generator of its own
    errors = np.abs(np.array(estimates) / exact - 1)
    assert np.mean(estimates) == pytest.approx(exact, rel=0.01) and errors.max() < 0.15, (np.mean(estimates), exact)
    assert tracker.peak_bytes == (4096 + 4) * 4  # the drawn blocks and the tail, not the weight's 1.2 MB
    tracker.before_step()
    assert tracker.after_step()[0][1].item() == 0.0  # nothing moved: exactly 0, sampled or not
    whole = UpdateTracker(groups, max_bytes=None, sample=weight.numel())
    whole.before_step()
    with torch.no_grad():
        weight.add_(delta)
    assert whole.after_step()[0][1].item() == pytest.approx(exact, rel=1e-6)  # no sample: the exact ratio


def test_dense_sampling_reuses_the_copy_buffers_and_a_plain_step_frees_them():
    model = PatientMLP()
    groups = [(n, list(m.parameters(recurse=False))) for n, m in model.named_modules() if n in MODULES]
    tracker = UpdateTracker(groups, max_bytes=None)
    tracker.before_step()
    first = [t.data_ptr() for t in tracker._step.pending[0].copy]
    tracker.after_step()
    for p in model.parameters():  # a known move: every weight up by 0.5
        p.data += 0.5
    tracker.before_step()
    assert [t.data_ptr() for t in tracker._step.pending[0].copy] == first  # no fresh allocation
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)
    vector, _read = tracker.after_step()
    expect = [1e-3 * (sum(p.numel() for p in ps) ** 0.5) for _n, ps in groups]
    weights = [torch.cat([p.detach().reshape(-1) - 1e-3 for p in ps]).double().norm().item() for _n, ps in groups]
    ratios = vector[len(groups) :].tolist()
    assert ratios == pytest.approx([e / w for e, w in zip(expect, weights)], rel=1e-4)
    tracker.release()
    assert tracker._spare == {}


def test_copies_on_an_accelerator_are_not_kept_between_sampled_steps():
    """Off a CPU the copy goes back to the allocator once read: kept, it would sit through the next
    step's activation peak (an H200 run of GPT-2 small sampled every step peaked +480 MiB, the weights)."""
    model = PatientMLP().to("meta")  # a device that is not the CPU, with no memory behind it
    groups = [(n, list(m.parameters(recurse=False))) for n, m in model.named_modules() if n in MODULES]
    tracker = UpdateTracker(groups, max_bytes=None)
    tracker.before_step()
    assert tracker._step is not None and tracker._step.pending[0].copy[0].is_meta
    vector, read = tracker.after_step()
    assert vector is not None and vector.is_meta and len(read) == len(groups)
    assert tracker._spare == {}


# -- against independent references in real fits ------------------------------------------------------------
@pytest.mark.parametrize("every", [2, 1])  # 1: consecutive sampled steps reuse the copy buffers
def test_plain_sgd_ratio_is_lr_times_gradient_norm_over_weight_norm(every):
    spy, monitor = WeightSpy(), HealthMonitor(every_n_steps=every, verbose=False)
    model = PatientMLP(lr=0.05)
    _fit(model, monitor, spy=spy)
    for step in range(0, 7, every):
        for name in MODULES:
            g = torch.cat([t.double().reshape(-1) for t in spy.grads[step][name]]).norm().item()
            w = torch.cat([t.double().reshape(-1) for t in spy.before[step][name]]).norm().item()
            assert _at(monitor, "update_ratio", name, step) == pytest.approx(0.05 * g / w, rel=1e-5), (step, name)
            assert _at(monitor, "param_norm", name, step) == pytest.approx(w, rel=1e-6)
    assert [s for s, _ in monitor.curves("update_ratio")["net.0"]] == list(range(0, 8, every))  # sampled steps only


class AdamPatient(PatientMLP):
    def __init__(self, lrs=None, **kw):
        super().__init__(**kw)
        self.lrs = lrs or {}

    def configure_optimizers(self):
        groups = [
            {"params": list(self.net[int(name.split(".")[1])].parameters()), "lr": self.lrs.get(name, 1e-2)}
            for name in MODULES
        ]
        return torch.optim.AdamW(groups, weight_decay=0.1)


def test_adam_with_weight_decay_equals_the_difference_of_snapshots_taken_by_the_test():
    spy, monitor = WeightSpy(), HealthMonitor(every_n_steps=1, verbose=False)
    _fit(AdamPatient(), monitor, spy=spy, steps=6, gradient_clip_val=0.5)
    for step in range(6):
        for name in MODULES:
            assert _at(monitor, "update_ratio", name, step) == pytest.approx(spy.ratio(step, name), rel=1e-5)


class WidePatient(AdamPatient):
    """The patient with a 512 x 512 middle layer (262,144 weights: sampled at the default 65,536)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.net = nn.Sequential(nn.Linear(8, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 4))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.1)


@pytest.mark.parametrize("sample", [65536, None])
def test_a_large_layer_is_read_on_a_sample_within_a_percent_and_exactly_without_one(sample):
    spy, monitor = WeightSpy(), HealthMonitor(every_n_steps=1, verbose=False, update_ratio_sample=sample)
    _fit(WidePatient(), monitor, spy=spy, steps=6)
    for step in range(6):
        for name in ("net.0", "net.2", "net.4"):
            tolerance = 0.02 if sample is not None and name == "net.2" else 1e-5  # the others fit the sample
            assert _at(monitor, "update_ratio", name, step) == pytest.approx(spy.ratio(step, name), rel=tolerance)
            assert _at(monitor, "param_norm", name, step) == pytest.approx(
                torch.cat([t.double().reshape(-1) for t in spy.before[step][name]]).norm().item(), rel=1e-6
            )


def test_a_module_with_learning_rate_zero_is_stalled_and_no_other_is():
    monitor = HealthMonitor(every_n_steps=1, verbose=False, dead_window=4)
    _fit(AdamPatient(lrs={"net.4": 0.0}), monitor, steps=8)
    assert {v for _, v in monitor.curves("update_ratio")["net.4"]} == {0.0}
    stalled = [f for f in monitor.diagnose() if f.kind == "stalled"]
    assert [f.layer for f in stalled] == ["net.4"] and stalled[0].hint and "not moving" in stalled[0].message


def test_a_frozen_module_reads_zero_and_is_not_stalled():
    class FreezeAtStep3(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                pl_module.net[4].requires_grad_(False)

    frozen_from_start = PatientMLP()
    frozen_from_start.net[0].requires_grad_(False)
    monitor = HealthMonitor(every_n_steps=1, verbose=False, dead_window=3)
    trainer = pl.Trainer(callbacks=[FreezeAtStep3(), monitor], **trainer_kwargs(max_steps=10, limit_val_batches=0))
    trainer.fit(frozen_from_start, patient_loaders()[0])
    ratios = dict(monitor.curves("update_ratio")["net.4"])
    assert ratios[2] > 0 and all(ratios[s] == 0.0 for s in range(3, 10))
    assert "net.0" not in monitor.curves("update_ratio")  # frozen before set-up: not a monitored group
    assert not [f for f in monitor.diagnose() if f.kind == "stalled"]


def test_an_amp_skipped_step_reads_zero_and_is_not_stalled():
    spy, monitor = WeightSpy(), HealthMonitor(every_n_steps=1, verbose=False, dead_window=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16 gradients overflow for several steps
    _fit(PatientMLP(), monitor, spy=spy, steps=6, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    skipped = [s for s in range(6) if all(spy.ratio(s, n) == 0 for n in MODULES)]
    assert len(skipped) >= 2  # the scaler really skipped steps (weights untouched)
    for step in skipped:
        assert all(_at(monitor, "update_ratio", n, step) == 0.0 for n in MODULES)
    assert not [f for f in monitor.diagnose() if f.kind == "stalled"]


@pytest.mark.parametrize("name", ["mlp", "lm"])
def test_a_healthy_adam_1e3_run_is_neither_stalled_nor_unstable(name):
    module, loader = make_workload(name, num_batches=12, tiny=True)
    if name == "mlp":  # full width: 784- and 1024-fan-in Linears are where Adam's first steps are largest
        module = MLP(width=1024, depth=2)
    monitor = HealthMonitor(every_n_steps=1, verbose=False)
    pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_steps=12, limit_val_batches=0)).fit(module, loader)
    ratios = [v for pts in monitor.curves("update_ratio").values() for _, v in pts if np.isfinite(v)]
    assert ratios and max(ratios) > 1e-3  # Adam really moved the weights
    assert not [f for f in monitor.diagnose() if f.kind in ("stalled", "unstable")]


def test_a_too_large_step_is_unstable():
    monitor = HealthMonitor(every_n_steps=1, verbose=False, dead_window=3)
    _fit(AdamPatient(lrs={"net.2": 1.0}), monitor, steps=6)
    assert "net.2" in {f.layer for f in monitor.diagnose() if f.kind == "unstable"}


# -- the depth profile ---------------------------------------------------------------------------------------
class DeepSigmoid(PatientMLP):
    """Eight sigmoid layers at a small init: the gradient shrinks several-fold per layer towards the input."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        layers = []
        for i in range(8):
            linear = nn.Linear(8 if i == 0 else 16, 16)
            with torch.no_grad():
                linear.weight.copy_(torch.randn(16, linear.in_features, generator=g) * 0.1)
            layers += [linear, nn.Sigmoid()]
        self.net = nn.Sequential(*layers, nn.Linear(16, 4))


def test_the_depth_profile_is_logged_and_names_where_the_gradient_vanishes(tmp_path, tb_scalars):
    monitor = HealthMonitor(every_n_steps=2, verbose=False, heatmap_every_n_samples=2)
    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit(DeepSigmoid(), monitor, steps=6, loggers=[logger])
    scalars = tb_scalars(logger.log_dir)
    grad = {name: dict(pts) for name, pts in monitor.curves("grad_norm").items()}
    gains = monitor.curves("grad_gain")
    assert set(gains) == {f"net.{2 * i + 1}" for i in range(1, 8)}
    for i in range(1, 8):
        later, earlier = f"net.{2 * i + 1}", f"net.{2 * i - 1}"
        for step, gain in gains[later]:
            assert gain == pytest.approx(grad[earlier][step] / grad[later][step], rel=1e-9)
        assert [s for s, _ in scalars[f"health/grad_gain/{later}"]] == [0, 2, 4]
    flow = [f for f in monitor.diagnose() if f.kind == "gradient_flow"]
    assert flow and all(f.value < 0.1 for f in flow)
    for f in flow:  # the stretch is named by both ends
        assert "shrinks" in f.message and f.message.endswith(f"from {f.layer} to net.{int(f.layer[4:]) - 2}")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logger.log_dir), size_guidance={"images": 0})
    acc.Reload()
    images = acc.Images("health/depth_profile")
    assert images and images[-1].width > 100


def test_thresholds_for_the_new_rules_are_validated():
    with pytest.raises(ValueError, match="flow_gain"):
        Thresholds(flow_gain=0.5)
    with pytest.raises(ValueError, match="unstable_update_ratio"):
        Thresholds(unstable_update_ratio=0)
    with pytest.raises((TypeError, ValueError), match="update_ratio_max_bytes"):
        HealthMonitor(update_ratio_max_bytes=-1)
    with pytest.raises(ValueError, match="update_ratio_sample"):
        HealthMonitor(update_ratio_sample=10)


# -- two optimizers under manual optimization -------------------------------------------------------------------
class TwoOptimizerGan(pl.LightningModule):
    """Lightning's GAN recipe: D (Adam) steps on its loss, then G (SGD with momentum) on its own, each toggled.

    The module itself copies every Linear's weights right before and right after each ``opt.step()``:
    the reference update of each module is the step of the optimizer that owns it.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.g = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4))
        self.d = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
        self.reference: dict[int, dict[str, tuple[float, float]]] = {}  # step -> module -> (ratio, ||W_before||)

    def _stepped(self, opt, owner: nn.Module, prefix: str, ref: dict[str, tuple[float, float]]) -> None:
        linears = {f"{prefix}.{i}": m for i, m in enumerate(owner) if isinstance(m, nn.Linear)}
        before = {n: torch.cat([p.detach().double().flatten() for p in m.parameters()]) for n, m in linears.items()}
        opt.step()
        for n, m in linears.items():
            after = torch.cat([p.detach().double().flatten() for p in m.parameters()])
            ref[n] = (((after - before[n]).norm() / before[n].norm()).item(), before[n].norm().item())

    def training_step(self, batch, batch_idx):
        (x,) = batch
        step, (opt_d, opt_g) = self.global_step, self.optimizers()
        ref: dict[str, tuple[float, float]] = {}
        fake = self.g(torch.randn(x.shape[0], 4))
        self.toggle_optimizer(opt_d)  # G's parameters stop requiring a gradient until untoggled
        d_loss = nn.functional.softplus(-self.d(x)).mean() + nn.functional.softplus(self.d(fake.detach())).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        self._stepped(opt_d, self.d, "d", ref)
        self.untoggle_optimizer(opt_d)
        self.toggle_optimizer(opt_g)
        g_loss = nn.functional.softplus(-self.d(self.g(torch.randn(x.shape[0], 4)))).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        self._stepped(opt_g, self.g, "g", ref)
        self.untoggle_optimizer(opt_g)
        self.reference[step] = ref

    def configure_optimizers(self):
        return torch.optim.Adam(self.d.parameters(), lr=1e-2), torch.optim.SGD(
            self.g.parameters(), lr=0.05, momentum=0.9
        )


def test_two_optimizers_each_module_reads_the_step_of_its_own_optimizer():
    model = TwoOptimizerGan()
    monitor = HealthMonitor(every_n_steps=1, verbose=False)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(96, 4)), batch_size=16)
    pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=1, limit_val_batches=0)).fit(model, data)
    ratios, norms = monitor.curves("update_ratio"), monitor.curves("param_norm")
    modules = ("d.0", "d.2", "g.0", "g.2")
    assert len(model.reference) == 6 and {m: [s for s, _ in ratios[m]] for m in modules} == {
        m: sorted(model.reference) for m in modules
    }  # global_step counts both optimizers' steps: every batch starts on an even step, and each is sampled
    for name in modules:
        for (step, ratio), (_, norm) in zip(ratios[name], norms[name]):
            want_ratio, want_norm = model.reference[step][name]
            assert want_ratio > 1e-4  # every optimizer really moved its modules
            assert ratio == pytest.approx(want_ratio, rel=1e-5), (step, name)
            assert norm == pytest.approx(want_norm, rel=1e-6), (step, name)
    assert not [f for f in monitor.diagnose() if f.kind == "stalled"]


def test_each_optimizer_is_read_right_after_its_step_even_beside_other_step_hooks():
    a, b, idle = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)
    groups = [("a", list(a.parameters())), ("b", list(b.parameters())), ("idle", list(idle.parameters()))]
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    seen = []
    user = opt_a.register_step_post_hook(lambda *_: seen.append("user hook"))  # ours is added (and removed) beside it
    tracker = UpdateTracker(groups, max_bytes=None)
    for p in [*a.parameters(), *b.parameters(), *idle.parameters()]:
        p.grad = torch.ones_like(p)
    w_a = torch.cat([p.detach().flatten() for p in a.parameters()]).double()
    tracker.before_step(opt_a)
    opt_a.step()
    with torch.no_grad():
        a.weight.add_(100.0)  # after A's step (e.g. weight clipping by hand): not part of A's update
    w_b = torch.cat([p.detach().flatten() for p in b.parameters()]).double()
    tracker.before_step(opt_b)  # B's step is skipped (as a GradScaler does with inf gradients)
    vector, read = tracker.after_step()
    assert vector is not None and read == [0, 1, 2] and seen == ["user hook"]
    ratios = vector[3:].tolist()
    assert ratios[0] == pytest.approx(0.1 * (w_a.numel() ** 0.5) / w_a.norm().item(), rel=1e-6)
    assert ratios[1] == 0.0 and ratios[2] == 0.0 and vector[1].item() == pytest.approx(w_b.norm().item())
    assert list(opt_a._optimizer_step_post_hooks) == [user.id] and not opt_b._optimizer_step_post_hooks


# -- the same verdicts offline: `lightning-health report` over the event files ---------------------------------
class FrozenByAccident(PatientMLP):
    """``net.4`` still requires a gradient, but ``configure_optimizers`` forgot it: it never moves."""

    def configure_optimizers(self):
        return torch.optim.Adam([p for n, p in self.named_parameters() if not n.startswith("net.4.")], lr=1e-2)


LEARNING_RULES = ("stalled", "unstable", "gradient_flow")


def _report_findings(log_dir, capsys, *args: str) -> list[dict]:
    capsys.readouterr()
    assert main(["report", str(log_dir), "--json", *args]) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    return run["findings"]


@pytest.mark.parametrize("model", [FrozenByAccident, DeepSigmoid])
def test_the_report_replays_the_learning_rules_as_the_run_judged_them(tmp_path, capsys, model):
    monitor = HealthMonitor(every_n_steps=1, verbose=False)  # dead_window 4: the report's default window too
    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit(model(), monitor, steps=8, loggers=[logger])
    keys = ("layer", "kind", "step", "last_step", "active", "message")  # the message names both ends of a stretch
    live = {tuple(getattr(f, k) for k in keys) for f in monitor.diagnose() if f.kind in LEARNING_RULES}
    offline = {tuple(f[k] for k in keys) for f in _report_findings(logger.log_dir, capsys)}
    assert live and live == {key for key in offline if key[1] in LEARNING_RULES}
    if model is FrozenByAccident:
        assert {key[:2] for key in live} == {("net.4", "stalled")}
    else:  # the gradient dies on the way to the first layers, which barely move either
        assert {key[1] for key in live} == {"gradient_flow", "stalled"}


def test_the_report_reads_amp_skipped_steps_back_and_judges_them_as_the_run_did(tmp_path, capsys):
    monitor = HealthMonitor(every_n_steps=1, verbose=False, dead_window=2)
    logger = TensorBoardLogger(tmp_path, name="tb")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16 gradients overflow for several steps
    _fit(PatientMLP(), monitor, steps=6, loggers=[logger], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    skipped = read_run(logger.log_dir).amp_skipped_steps
    assert len(skipped) >= 2 and all(_at(monitor, "update_ratio", "net.0", s) == 0.0 for s in skipped)
    keys = ("layer", "kind", "step", "active")  # AMP's inf gradients on skipped steps are no finding, offline too
    offline = {tuple(f[k] for k in keys) for f in _report_findings(logger.log_dir, capsys, "--window", "2")}
    assert offline == {tuple(getattr(f, k) for k in keys) for f in monitor.diagnose()}
    assert GRADIENT_READINGS == LIVE_GRADIENT_READINGS  # the replay drops what the live monitor drops


def test_report_png_draws_the_gradient_norm_across_depth_when_the_run_logged_it(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    from lightning_health.offline.event_reader import read_runs
    from lightning_health.sinks.compare import DEPTH_TITLE, comparison_figure

    monitor = HealthMonitor(every_n_steps=2, verbose=False)
    logger = TensorBoardLogger(tmp_path / "runs", name="deep")
    _fit(DeepSigmoid(), monitor, steps=6, loggers=[logger])
    writer = SummaryWriter(str(tmp_path / "runs" / "old"))  # a run without gradient norms beside it
    for step in (0, 10):
        writer.add_scalar("health/dead_fraction/net.1", 0.1, step)
    writer.close()
    target = tmp_path / "out" / "health.png"
    assert main(["report", str(tmp_path / "runs"), "--png", str(target)]) == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    deep, old = sorted(read_runs(tmp_path / "runs"), key=lambda run: run.name)
    figure = comparison_figure([deep, old])
    by_title = {axis.get_title(): axis for axis in figure.axes}
    axis = by_title[f"{deep.name}: {DEPTH_TITLE}"]
    sigmoids = [f"net.{2 * i + 1}" for i in range(8)]  # the monitored layers, input side first
    assert [label.get_text() for label in axis.get_xticklabels()] == sigmoids
    assert axis.get_yscale() == "log" and [line.get_label() for line in axis.get_lines()] == [
        "step 0",
        "step 2",
        "step 4",
    ]
    grad = monitor.curves("grad_norm")
    for line, step in zip(axis.get_lines(), (0, 2, 4)):  # float32 in the event file
        np.testing.assert_allclose(line.get_ydata(), [dict(grad[n])[step] for n in sigmoids], rtol=1e-6)
    assert not by_title[f"{old.name}: {DEPTH_TITLE}"].get_lines()  # drawn empty, with a note
    assert not any(DEPTH_TITLE in axis.get_title() for axis in comparison_figure([old]).axes)  # no column at all
