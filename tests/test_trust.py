"""Findings you can trust: not observed is not dead, per-unit collapse, scale-free gradients, NaN is not
healthy, and a finding keeps its worst moment. Each case runs a real Trainer fit."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_health import HealthMonitor, Thresholds
from lightning_health.diagnosis import diagnose_curves
from lightning_health.sinks.format import finding_rows, findings_markdown
from tests.conftest import trainer_kwargs


def _loader(n=64, d=8, batch=16, seed=0, targets=2, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, targets, (n,), generator=g) if targets else scale * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


class _Module(pl.LightningModule):
    lr = 0.05

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


# -- 1. not observed is not dead -------------------------------------------------------------------


class AuxHeadNet(_Module):
    """The aux head runs in training only: during validation it gives no output at all."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        self.aux = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.body(x), y)
        return loss + 0.1 * self.aux(x).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.body(x), y))


def test_a_head_that_runs_only_in_training_is_not_dead_in_validation():
    torch.manual_seed(0)
    monitor = HealthMonitor(every_n_steps=1, dead_window=2, on_critical="stop", verbose=False)
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=3, num_sanity_val_steps=0))
    trainer.fit(AuxHeadNet(), _loader(), _loader(seed=1))
    assert trainer.global_step == 12 and trainer.current_epoch == 3  # not stopped
    assert not [f for f in monitor.diagnose() if f.kind == "dead"]
    val = monitor.curves("val_dead_fraction")
    assert "aux.1" not in val  # no reading for a pass in which it gave no output
    assert [s for s, _ in val["body.1"]] == [4, 8, 12]  # layers that ran are read as before
    assert len(monitor.curves("dead_fraction")["aux.1"]) == 11  # and training still reads the head


# -- 6. collapse per unit --------------------------------------------------------------------------


class ConstantUnitsNet(_Module):
    """``net.3`` gets no signal (zero, frozen weights): each unit outputs its own constant tanh(bias)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)
        )
        with torch.no_grad():
            self.net[2].weight.zero_()
            self.net[2].bias.uniform_(-2, 2)
            self.net[4].bias.fill_(-100.0)  # net.5: a dead ReLU layer, constant 0: dead, not collapsed
        self.net[2].weight.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)


def test_a_layer_whose_units_are_each_constant_is_collapsed():
    torch.manual_seed(0)
    model = ConstantUnitsNet()
    monitor = HealthMonitor(every_n_steps=1, dead_window=2, verbose=False)
    pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_steps=4)).fit(model, _loader())
    # Independent check: the pooled std looks healthy, yet no unit varies across the batch.
    x = next(iter(_loader()))[0]
    with torch.no_grad():
        h = model.net[:4](x)
    assert h.std().item() > 0.3 and h.std(dim=0).max().item() < 1e-6
    collapsed = monitor.curves("collapsed_fraction")
    assert [v for _, v in collapsed["net.3"]] == [1.0] * 4
    assert [v for _, v in collapsed["net.1"]] == [0.0] * 4
    assert [v for _, v in collapsed["net.5"]] == [0.0] * 4  # silent units are dead's business
    kinds = {(f.layer, f.kind) for f in monitor.diagnose()}
    assert ("net.3", "collapsed") in kinds
    assert ("net.1", "collapsed") not in kinds
    assert ("net.5", "dead") in kinds and ("net.5", "collapsed") not in kinds


# -- 7. scale-free gradient rules ---------------------------------------------------------------


class Regressor(_Module):
    def __init__(self, reduction="mean", lr=1e-3, depth=3):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(8 if i == 0 else 32, 32), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(32, 1))
        self.reduction, self.lr = reduction, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y, reduction=self.reduction)


def _fit_regressor(reduction, lr, steps=12, scale=100.0, batch=64):
    torch.manual_seed(0)
    monitor = HealthMonitor(every_n_steps=1, dead_window=2, verbose=False)
    loader = _loader(n=256, batch=batch, targets=0, scale=scale)
    pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_steps=steps)).fit(Regressor(reduction, lr), loader)
    return monitor


def _verdicts(monitor):
    return sorted((f.layer, f.kind, f.severity, f.step) for f in monitor.diagnose())


def test_loss_reduction_sum_and_mean_get_the_same_verdict():
    batch = 64
    mean = _fit_regressor("mean", 1e-3, batch=batch)
    total = _fit_regressor("sum", 1e-3 / batch, batch=batch)
    # The same trajectory: gradients differ by the batch size, nothing else.
    g_mean, g_sum = mean.curves("grad_std")["net.5"], total.curves("grad_std")["net.5"]
    np.testing.assert_allclose([v * batch for _, v in g_mean], [v for _, v in g_sum], rtol=1e-3)
    assert max(v for _, v in g_sum) > 10 > max(v for _, v in g_mean)  # an absolute threshold splits them
    assert _verdicts(mean) == _verdicts(total)
    assert not [f for f in mean.diagnose() if "gradient" in f.kind]
    # The same verdicts replayed offline from the curves.
    curves = {m: total.curves(m) for m in ("grad_std", "grad_norm", "act_std")}
    assert sorted((f.layer, f.kind) for f in diagnose_curves(curves, layer_order=total.monitored_layers)) == sorted(
        (layer, kind) for layer, kind, _s, _t in _verdicts(total)
    )


def test_a_genuinely_exploding_run_is_still_called_exploding():
    monitor = _fit_regressor("mean", 1.0, steps=8, scale=10.0)  # diverges: x1e6 in 4 steps, then NaN
    grads = [v for _, v in monitor.curves("grad_std")["net.5"] if math.isfinite(v)]
    assert max(grads) > 100 * grads[0]
    exploding = [f for f in monitor.diagnose() if f.kind == "exploding_gradient"]
    assert exploding and {f.severity for f in exploding} == {"critical"}
    assert "its usual level" in exploding[0].message


def test_the_absolute_threshold_is_still_available():
    t = Thresholds(exploding_grad_std=10.0)
    monitor = HealthMonitor(every_n_steps=1, thresholds=t, verbose=False)
    assert monitor.thresholds.exploding_grad_std == 10.0
    with pytest.raises(ValueError, match="exploding_growth"):
        Thresholds(exploding_growth=1.0)


# -- 8. NaN is not healthy ----------------------------------------------------------------------


class Poison(nn.Module):
    """Multiplies by NaN once switched on (an injected fault)."""

    on = False

    def forward(self, x):
        return x * float("nan") if self.on else x


class PoisonedNet(_Module):
    def __init__(self, from_step=3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), Poison(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
        self.from_step = from_step

    def training_step(self, batch, batch_idx):
        self.net[2].on = self.global_step >= self.from_step
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)


def test_a_nan_layer_reads_nan_not_healthy_on_every_sink(tmp_path, tb_scalars):
    torch.manual_seed(0)
    monitor = HealthMonitor(every_n_steps=1, dead_window=2, verbose=False)
    tb = TensorBoardLogger(tmp_path, name="tb")
    pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_steps=6, logger=tb)).fit(PoisonedNet(), _loader(n=96))
    scalars = tb_scalars(tb.log_dir)
    for metric in ("dead_fraction", "alive_fraction", "dormant_fraction", "collapsed_fraction"):
        logged = dict(scalars[f"health/{metric}/net.4"])
        assert all(math.isnan(logged[s]) for s in (3, 4, 5)), (metric, logged)
        assert all(math.isfinite(v) for s, v in logged.items() if s < 3), (metric, logged)
        curve = dict(monitor.curves(metric)["net.4"])
        assert all(math.isnan(curve[s]) for s in (3, 4, 5))
    assert not [f for f in monitor.diagnose() if f.layer == "net.4" and f.kind == "dead"]
    text = monitor.report().render_text()
    table = text.split("\n")
    assert "NaN/Inf outputs in" in table[1] and "net.4" in table[1]
    assert table[4].startswith("!! ")  # non-finite layers lead the table


# -- 9. a finding keeps its peak ----------------------------------------------------------------


class Silencer(nn.Module):
    """Holds the first ``k`` units far below zero: 6 of 10 for the first steps, then 3."""

    def __init__(self):
        super().__init__()
        self.k = 6

    def forward(self, x):
        mask = torch.zeros(x.shape[-1], device=x.device)
        mask[: self.k] = 1.0
        return x - 1e3 * mask


class RecoveringNet(_Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 10), Silencer(), nn.ReLU(), nn.Linear(10, 2))

    def training_step(self, batch, batch_idx):
        self.net[1].k = 6 if self.global_step < 6 else 3
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)


def test_a_finding_keeps_its_worst_moment(tmp_path):
    torch.manual_seed(0)
    monitor = HealthMonitor(every_n_steps=1, dead_window=2, verbose=False)
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_steps=10))
    trainer.fit(RecoveringNet(), _loader(n=160))
    assert [v for _, v in monitor.curves("dead_fraction")["net.2"]][-1] == pytest.approx(0.3)
    (dead,) = [f for f in monitor.diagnose() if f.kind == "dead"]
    assert (dead.severity, dead.value, dead.active) == ("warning", pytest.approx(0.3), True)
    assert (dead.peak_severity, dead.peak_value, dead.peak_step) == ("critical", pytest.approx(0.6), 1)
    assert "worst: [critical] 60% of units dead" in str(dead) and "at step 1" in str(dead)
    assert "worst: [critical]" in monitor.report().render_text()
    assert "critical at step 1" in findings_markdown(9, [dead])
    (row,) = finding_rows([dead])
    assert row[3] == "warning" and row[8:10] == ["critical", 1]
    # Through a real checkpoint, and from a checkpoint written before peaks were kept.
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["callbacks"][monitor.state_key]
    resumed = HealthMonitor(every_n_steps=1, dead_window=2, verbose=False)
    resumed.load_state_dict(state)
    assert resumed.diagnose() == monitor.diagnose()
    old = [{k: v for k, v in f.items() if not k.startswith("peak_")} for f in state["findings"]]
    legacy = HealthMonitor(every_n_steps=1, dead_window=2, verbose=False)
    legacy.load_state_dict({**state, "findings": old})
    (f,) = legacy.diagnose()
    assert (f.peak_severity, f.peak_step) == ("warning", f.last_step)
