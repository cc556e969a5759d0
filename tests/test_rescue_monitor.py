"""HealthMonitor's rescues and dormancy readings in real Trainer runs.

Loss bound at the moment of a ``reinit`` (issue 7): the monitor recycles units that were dead over
the whole window, and zeroes their outgoing weights, so the network computes the same function
right after the reset. We assert ``|loss_after - loss_before| <= 1e-6 * max(1, loss_before)`` on a
fixed batch, measured just before and just after the monitor's ``on_train_batch_end``; the
measured difference is exactly 0.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_health import HealthMonitor
from lightning_health.offline.patients import patient_data, patient_loaders
from tests.conftest import trainer_kwargs

LOSS_JUMP_BOUND = 1e-6


class DyingMLP(pl.LightningModule):
    """8-64-64-4 ReLU MLP trained with Adam; the first ``dead`` units of `net.1` start (and stay) dead."""

    def __init__(self, dead: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
        with torch.no_grad():
            self.net[0].bias[:dead] = -20.0  # pre-activation < 0 for every input: no gradient ever reaches them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Probe(pl.Callback):
    """Snapshots the loss on a fixed batch, the parameters and the Adam state at every batch end."""

    def __init__(self) -> None:
        self.x, self.y = patient_data().tensors
        self.snaps: dict[int, dict[str, Any]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        with torch.no_grad():  # by hand, not through the modules: their hooks would read this forward too
            h = self.x
            for i, layer in enumerate(pl_module.net):
                h = nn.functional.linear(h, layer.weight, layer.bias) if i % 2 == 0 else torch.relu(h)
            loss = nn.functional.cross_entropy(h, self.y).item()
        opt = trainer.optimizers[0]
        self.snaps[trainer.global_step] = {
            "loss": loss,
            "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "state": {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in pl_module.named_parameters()},
        }


def _fit(
    model: pl.LightningModule, callbacks: list[pl.Callback], epochs: int = 3, ckpt_path: str | None = None, **kw: Any
) -> pl.Trainer:
    train, _ = patient_loaders()
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(max_epochs=epochs, **kw))
    trainer.fit(model, train, ckpt_path=ckpt_path)
    return trainer


def test_reinit_recovers_a_dead_layer_in_a_real_fit_without_a_loss_jump() -> None:
    before, after = Probe(), Probe()  # around the monitor: Lightning calls callbacks in list order
    monitor = HealthMonitor(
        every_n_steps=1, dead_window=2, rescue="reinit", rescue_every=5, dormant_threshold=0.0, verbose=False
    )
    model = DyingMLP()
    _fit(model, [before, monitor, after])  # 5 batches an epoch: steps 0..14; the 5th sampled step (step 4) rescues

    dead = dict(monitor.curves("dead_fraction")["net.1"])
    assert dead[1] >= 0.4 and dead[4] >= 0.4  # half the layer dead, reading after reading
    first = [e for e in monitor.rescues() if e.layer == "net.1"]
    assert [(e.step, e.action, e.units) for e in first] == [(4, "reinit", tuple(range(32)))]
    assert 5 not in dead  # the window restarted after the reset: no stale reading
    assert all(value < 0.1 for step, value in dead.items() if step > 5)
    assert max(dead) == 14
    assert dict(monitor.curves("rescued_units")["net.1"]) == {4: 32.0}

    # The function did not change at the reset (the batch of step 4 ends with global_step 5) ...
    loss_before, loss_after = before.snaps[5]["loss"], after.snaps[5]["loss"]
    assert abs(loss_after - loss_before) <= LOSS_JUMP_BOUND * max(1.0, abs(loss_before))
    # ... exactly the recycled rows/columns changed, and the Adam state of every other unit is bit-identical.
    mask = torch.zeros(64, dtype=torch.bool)
    mask[:32] = True
    p0, p1 = before.snaps[5]["params"], after.snaps[5]["params"]
    s0, s1 = before.snaps[5]["state"], after.snaps[5]["state"]
    rescued_net3 = [e for e in monitor.rescues() if e.layer == "net.3" and e.step == 4]
    rows_net2 = torch.zeros(64, dtype=torch.bool)  # net.3's recycled units are rows of net.2
    for e in rescued_net3:
        rows_net2[list(e.units)] = True
    assert torch.equal(p1["net.0.weight"][~mask], p0["net.0.weight"][~mask])
    assert torch.all(p1["net.0.bias"][mask] == 0)
    untouched = (~rows_net2)[:, None] & ~mask[None, :]  # net.2 entries neither a net.1 column nor a net.3 row
    assert torch.all(p1["net.2.weight"][~rows_net2][:, mask] == 0)
    assert torch.equal(p1["net.2.weight"][untouched], p0["net.2.weight"][untouched])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(s1["net.0.weight"][key][~mask], s0["net.0.weight"][key][~mask])
        assert torch.all(s1["net.0.weight"][key][mask] == 0)
        assert torch.equal(s1["net.0.bias"][key][~mask], s0["net.0.bias"][key][~mask])
        assert torch.equal(s1["net.2.weight"][key][untouched], s0["net.2.weight"][key][untouched])
        assert torch.all(s1["net.2.weight"][key][:, mask][~rows_net2] == 0)
    cols_net4 = rows_net2  # net.3's recycled units are also the columns of net.4 that were zeroed
    assert torch.equal(p1["net.4.weight"][:, ~cols_net4], p0["net.4.weight"][:, ~cols_net4])
    assert torch.equal(p1["net.4.bias"], p0["net.4.bias"])
    for name in p0:
        assert torch.equal(s1[name]["step"], s0[name]["step"])  # Adam's shared step is left alone

    # Readings: dormant (tau=0) equals dead for ReLU; alive and last-fired show the recovery.
    assert monitor.curves("dormant_fraction")["net.1"] == monitor.curves("dead_fraction")["net.1"]
    alive = dict(monitor.curves("alive_fraction")["net.1"])
    assert alive[0] <= 0.5 and alive[14] > 0.9
    last = monitor.last_fired("net.1")
    assert len(last) == 64 and min(last) > 4


def test_dormancy_reading_default_and_off(tmp_path: Any, tb_scalars: Any) -> None:
    monitor = HealthMonitor(every_n_steps=2, dead_window=2, verbose=False)  # dormant_threshold=0.025 by default
    tb = TensorBoardLogger(tmp_path, name="tb")
    _fit(DyingMLP(dead=16), [monitor], epochs=2, logger=tb)
    scalars = tb_scalars(tb.log_dir)
    dormant = [v for _, v in scalars["health/dormant_fraction/net.1"]]
    dead = [v for _, v in scalars["health/dead_fraction/net.1"]]
    assert [s for s, _ in scalars["health/dormant_fraction/net.1"]] == [2, 4, 6, 8]
    assert all(d >= x >= 0.25 for d, x in zip(dormant, dead))  # tau=0.025 catches at least the dead units
    assert [s for s, _ in scalars["health/alive_fraction/net.1"]] == [0, 2, 4, 6, 8]
    assert "health/rescued_units/net.1" not in scalars  # rescue is off by default
    assert monitor.rescues() == [] and monitor.last_fired("net.1")[:16] == [-1] * 16

    off = HealthMonitor(every_n_steps=2, dead_window=2, dormant_threshold=None, verbose=False)
    _fit(DyingMLP(dead=16), [off], epochs=1)
    assert off.curves("dormant_fraction") == {} and "net.1" in off.curves("dead_fraction")


def test_leaky_swaps_and_the_hooks_follow_the_new_module() -> None:
    monitor = HealthMonitor(every_n_steps=1, dead_window=2, rescue="leaky", rescue_every=4, leaky_slope=0.1,
                            verbose=False, log_histograms=False)  # fmt: skip
    model = DyingMLP()
    old = model.net[1]
    _fit(model, [monitor], epochs=2)
    assert isinstance(model.net[1], nn.LeakyReLU) and model.net[1].negative_slope == 0.1
    events = [e for e in monitor.rescues() if e.layer == "net.1"]
    assert [(e.step, e.action) for e in events] == [(3, "leaky")]
    assert not old._forward_hooks and not model.net[1]._forward_hooks  # removed at teardown, from both
    act_min = dict(monitor.curves("act_min")["net.1"])
    assert act_min[3] >= 0 and all(act_min[s] < 0 for s in range(4, 10))  # negative outputs: the new module is read
    assert 4 not in dict(monitor.curves("dead_fraction")["net.1"])  # window restarted after the swap


def test_resume_after_rescues_replays_the_swap_and_keeps_the_record(tmp_path: Any) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)
    first = HealthMonitor(every_n_steps=1, dead_window=2, rescue="leaky", rescue_every=4, verbose=False)
    model = DyingMLP()
    _fit(model, [first, ckpt], epochs=1, enable_checkpointing=True)
    assert [e.step for e in first.rescues()] == [3, 3]  # both ReLUs had dead units at step 3
    last_fired = first.last_fired("net.1")

    resumed = HealthMonitor(every_n_steps=1, dead_window=2, rescue="leaky", rescue_every=4, verbose=False)
    fresh = DyingMLP()
    assert type(fresh.net[1]) is nn.ReLU
    seen: dict[str, Any] = {}

    class Check(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seen["modules"] = (type(pl_module.net[1]), type(pl_module.net[3]))
            seen["hooked"] = bool(pl_module.net[1]._forward_hooks)
            seen["last_fired"] = resumed.last_fired("net.1")

    _fit(fresh, [resumed, Check()], epochs=2, ckpt_path=str(tmp_path / "epoch=0-step=5.ckpt"))
    assert seen == {"modules": (nn.LeakyReLU, nn.LeakyReLU), "hooked": True, "last_fired": last_fired}
    assert resumed.rescues() == first.rescues()  # restored, and nothing left to rescue after the swap
    assert min(s for s, _ in resumed.curves("act_std")["net.1"]) == 0  # history restored too
    assert max(s for s, _ in resumed.curves("act_std")["net.1"]) == 9


def test_reinit_resume_restores_events_and_last_fired(tmp_path: Any) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)
    first = HealthMonitor(every_n_steps=1, dead_window=2, rescue="reinit", rescue_every=5, verbose=False)
    model = DyingMLP()
    _fit(model, [first, ckpt], epochs=1, enable_checkpointing=True)
    assert any(e.layer == "net.1" and e.step == 4 for e in first.rescues())
    resumed = HealthMonitor(every_n_steps=1, dead_window=2, rescue="reinit", rescue_every=5, verbose=False)
    fresh = DyingMLP()
    _fit(fresh, [resumed], epochs=2, ckpt_path=str(tmp_path / "epoch=0-step=5.ckpt"))
    assert resumed.rescues()[: len(first.rescues())] == first.rescues()
    assert torch.all(fresh.net[0].bias[:32] > -20)  # the recycled weights came back from the checkpoint
    assert all(v < 0.1 for s, v in resumed.curves("dead_fraction")["net.1"] if s > 5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rescue": "prune"}, r"Expected `rescue` to be one of \(None, 'reinit', 'leaky'\), got 'prune'"),
        ({"rescue_every": 0}, "Expected `rescue_every` to be an int >= 1"),
        ({"dormant_threshold": -0.1}, r"Expected `dormant_threshold` to be None .* or a number in \[0, 1\)"),
        ({"dormant_threshold": float("nan")}, "dormant_threshold"),
        ({"rescue_init": "normal"}, "Expected `rescue_init` to be one of"),
        ({"leaky_slope": 1.0}, r"Expected `leaky_slope` to be a number in \(0, 1\), got 1.0"),
        ({"rescue_seed": "0"}, "Expected `rescue_seed` to be an int"),
    ],
)
def test_rescue_arguments_are_validated_by_name(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        HealthMonitor(**kwargs)


class _Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.fc(x)))


class _Twice(DyingMLP):
    """`net.1` is called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relu = self.net[1]
        return self.net[2](relu(self.net[0](relu(x))))


def test_refused_and_shared_layers_warn_once_and_are_left_alone() -> None:
    class Model(DyingMLP):
        def __init__(self) -> None:
            super().__init__()
            self.net = _Opaque()  # type: ignore[assignment]

    monitor = HealthMonitor(every_n_steps=1, dead_window=1, rescue="reinit", rescue_every=1, verbose=False)
    with pytest.warns(RuntimeWarning, match=r"will not treat `net.act`.*not an nn.Sequential") as rec:
        _fit(Model(), [monitor], epochs=1)
    assert sum("will not treat" in str(w.message) for w in rec) == 1
    assert monitor.rescues() == []

    twice = HealthMonitor(every_n_steps=1, dead_window=1, rescue="leaky", rescue_every=1, verbose=False)
    with pytest.warns(RuntimeWarning, match="called more than once per forward") as rec:
        model = _Twice()
        _fit(model, [twice], epochs=1)
    assert sum("more than once" in str(w.message) for w in rec) == 1
    assert type(model.net[1]) is nn.ReLU and twice.rescues() == []
