"""A 2-rank CPU run of Lightning's ``ModelParallelStrategy`` (FSDP2 or tensor parallel), for tests/test_sharded.py.

``ModelParallelStrategy`` launches its ranks by re-running the main script (Lightning's
``_SubprocessScriptLauncher``), so it cannot run inside pytest's own process: the test runs this
module with ``python -m tests.sharded_fit MODE OUT_DIR`` and Lightning starts rank 1 the same way.
Each rank writes every reading the monitor holds to ``OUT_DIR/rank<r>.json``, plus the bytes of
every collective ``lightning_health`` issued.

``MODE`` is ``fsdp`` (``fully_shard`` over a 2-rank data-parallel mesh) or ``tp`` (a column-parallel
Linear, then a row-parallel one, over a 2-rank tensor-parallel mesh). ``single`` runs the same
model on one process on the global batch: the reference (the test calls :func:`fit` for it).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_health import HealthMonitor

STEPS = 3
BATCH = 4
HIDDEN = 8
LR = float(os.environ.get("SHARDED_FIT_LR", "0"))  # 0 keeps the weights (the readings test); > 0: learning readings
WIDTH = int(os.environ.get("SHARDED_FIT_HIDDEN", str(HIDDEN)))  # a wider hidden layer: shards large enough to sample
SAMPLE = os.environ.get("SHARDED_FIT_SAMPLE")  # the monitor's update_ratio_sample (unset: its default)
DEAD_UNIT = 5  # never fires on any example: the alive fraction of `act` is 7/8


def rank_batch(dp_rank: int, step: int) -> torch.Tensor:
    """The examples of one data-parallel rank at one step (tensor-parallel ranks share them)."""
    return torch.randn(BATCH, 4, generator=torch.Generator().manual_seed(1000 * step + dp_rank))


def global_batch(dp_size: int, step: int) -> torch.Tensor:
    return torch.cat([rank_batch(r, step) for r in range(dp_size)])


class TinyMLP(pl.LightningModule):
    """Linear 4->8, ReLU, Linear 8->2 (8: ``hidden``); unit 5 of the hidden layer is dead; ``LR`` 0 keeps weights."""

    def __init__(self, mode: str = "single", dp_size: int = 1, hidden: int = WIDTH) -> None:
        super().__init__()
        self.mode, self.dp_size = mode, dp_size
        g = torch.Generator().manual_seed(0)
        self.up = nn.Linear(4, hidden)
        self.act = nn.ReLU()
        self.down = nn.Linear(hidden, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            self.up.weight[DEAD_UNIT].zero_()
            self.up.bias[DEAD_UNIT] = -1.0

    def configure_model(self) -> None:
        if self.mode == "tp":
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            mesh = self.device_mesh["tensor_parallel"]
            parallelize_module(self, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
        elif self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.up, mesh=mesh)
            fully_shard(self.down, mesh=mesh)
            fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.mode == "single":
            x = global_batch(self.dp_size, self.global_step)
        else:
            x = rank_batch(self.device_mesh["data_parallel"].get_local_rank(), self.global_step)
        return self(x).square().sum()  # a sum: activation gradients add up over ranks like the examples

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


class Recorder(pl.Callback):
    """Count the bytes of lightning_health's collectives; write the readings at teardown."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.calls: list[tuple[str, int]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        try:
            from lightning_health.pipeline import sync
        except ImportError:  # an older lightning_health: readings only
            return
        count = self.calls

        def all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            count.append(("all_reduce", tensor.numel() * tensor.element_size()))
            return dist.all_reduce(tensor, *args, **kwargs)

        sync.all_reduce = all_reduce  # type: ignore[assignment]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        monitor = next(c for c in trainer.callbacks if isinstance(c, HealthMonitor))  # type: ignore[attr-defined]
        readings = {m: monitor.curves(m) for m in monitor._history.metrics()}
        rank = trainer.global_rank
        (self.out / f"rank{rank}.json").write_text(json.dumps({"readings": readings, "calls": self.calls}))
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def monitor() -> HealthMonitor:
    sample = {} if SAMPLE is None else {"update_ratio_sample": int(SAMPLE)}
    return HealthMonitor(
        every_n_steps=1, layers=(nn.Linear, nn.ReLU), dead_window=2, verbose=False, dormant_threshold=0.025, **sample
    )


def fit(mode: str, out: Path, dp_size: int = 1) -> HealthMonitor:
    from lightning.pytorch.strategies import ModelParallelStrategy

    health = monitor()
    kwargs: dict[str, Any] = {"devices": 1}
    if mode != "single":
        dp, tp = (2, 1) if mode == "fsdp" else (1, 2)
        strategy = ModelParallelStrategy(dp, tp, process_group_backend="gloo", timeout=timedelta(seconds=60))
        kwargs = {"devices": 2, "strategy": strategy}
    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[health, Recorder(out)],
        max_steps=STEPS,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        **kwargs,
    )
    data = DataLoader(TensorDataset(torch.zeros(4 * STEPS, 1)), batch_size=1)
    trainer.fit(TinyMLP(mode, dp_size), data)
    return health


if __name__ == "__main__":
    torch.set_num_threads(1)
    fit(sys.argv[1], Path(sys.argv[2]))
