"""Rescues under DDP: 2 CPU processes (gloo, ddp_spawn) apply the identical change from synced masks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from lightning_health import HealthMonitor
from lightning_health.offline.patients import patient_data
from tests.conftest import ddp_spawn_kwargs
from tests.test_rescue_monitor import DyingMLP


class CrossRankCheck(pl.Callback):
    """At the end of training, compare every parameter and the rescue record across ranks."""

    def __init__(self, monitor: HealthMonitor, out: Path) -> None:
        self.monitor, self.out = monitor, out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])
        mine = {
            "params": flat.tolist(),
            "rescues": [(e.step, e.layer, list(e.units)) for e in self.monitor.rescues()],
            "last_fired": self.monitor.last_fired("net.1"),
            "dead": self.monitor.curves("dead_fraction").get("net.1", []),
        }
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        if trainer.global_rank == 0:
            identical = all(g == gathered[0] for g in gathered)
            self.out.write_text(json.dumps({"identical": identical, "rank0": {**gathered[0], "params": None}}))


@pytest.mark.ddp
def test_every_rank_applies_the_identical_rescue(tmp_path: Path) -> None:
    # dormant_threshold=0: recycle exactly the dead units; a borderline dormant score (tau 0.025) can
    # flip with the float summation order in the spawned workers and is not what this test is about.
    monitor = HealthMonitor(
        every_n_steps=1, dead_window=2, rescue="reinit", rescue_every=4, dormant_threshold=0.0, verbose=False
    )
    out = tmp_path / "ranks.json"
    trainer = pl.Trainer(**ddp_spawn_kwargs([monitor, CrossRankCheck(monitor, out)], max_epochs=3))
    # Lightning shards the data: each rank sees other examples, so local evidence differs. (No seeded
    # torch.Generator in the loader: it does not survive the pickling into spawned workers here.)
    trainer.fit(DyingMLP(), DataLoader(patient_data(), batch_size=8))
    result = json.loads(out.read_text())
    assert result["identical"], "ranks diverged after a rescue"
    rescues = result["rank0"]["rescues"]
    assert [r[0] for r in rescues if r[1] == "net.1"][:1] == [3]
    # every killed unit is recycled; a unit that died on its own in the window may be recycled too
    assert set(range(32)) <= set(next(r[2] for r in rescues if r[1] == "net.1"))
    dead = dict((s, v) for s, v in result["rank0"]["dead"])
    assert dead[1] >= 0.4 and all(v < 0.1 for s, v in dead.items() if s > 4)
