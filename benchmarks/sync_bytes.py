"""Bytes each rank hands to lightning_health's collectives per sampled step, at 2, 4 and 8 CPU ranks (gloo).

A tiny MLP's capture and accumulator run on every rank (plain torch.distributed, processes forked
with torch.multiprocessing); ``sync.all_reduce`` is wrapped to add up the bytes of each call. Run:
``python -m benchmarks.sync_bytes``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

STEPS = 3


def _rank(rank: int, world: int, port: int, queue: mp.SimpleQueue) -> None:
    from lightning_health.capture.hooks import Capture, Mode
    from lightning_health.capture.selection import select_layers
    from lightning_health.pipeline import sync
    from lightning_health.pipeline.accumulate import Accumulator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sent: list[int] = []
    original = sync.all_reduce

    def counting(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
        sent.append(tensor.numel() * tensor.element_size())
        original(tensor, op)

    sync.all_reduce = counting  # type: ignore[assignment]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    capture = Capture(select_layers(model), None, None, 8192, 0.01)
    accumulator = Accumulator(capture, window=2, tau=0.025)
    capture.attach()
    per_step = []
    for step in range(STEPS):
        capture.reset()
        capture.mode = Mode.TRAIN
        capture.new_batch()
        model(torch.randn(8, 16)).square().sum().backward()
        capture.mode = Mode.OFF
        sent.clear()
        accumulator.finish_train_step(step=step)
        per_step.append(sum(sent))
    queue.put((rank, per_step))
    dist.barrier()
    dist.destroy_process_group()


def measure(world: int, port: int) -> list[int]:
    """Bytes per sampled step on rank 0 (step 0 includes the layout agreement)."""
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get() for _ in procs)
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert all(results[r] == results[0] for r in results)  # every rank sends the same
    return results[0]


if __name__ == "__main__":
    torch.set_num_threads(1)
    base = 29500 + os.getpid() % 1000
    for i, world in enumerate((2, 4, 8)):
        print(world, measure(world, base + i), flush=True)
    sys.exit(0)
