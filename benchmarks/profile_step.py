"""Where a sampled step's extra time goes: ``torch.profiler`` and ``cProfile`` over HealthMonitor steps.

Runs a real fit of one workload with ``HealthMonitor(every_n_steps=1)`` (every step sampled), and
profiles a few steps after warm-up. Prints the top operators by self CPU time and the top Python
functions (cumulative) inside ``lightning_health``.

Run: ``python -m benchmarks.profile_step --workload mlp [--steps 5]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from benchmarks.harness import NUM_THREADS, _quiet
from benchmarks.workloads import WORKLOADS, make_workload


class _Profile(Callback):
    """Start profilers at batch ``start`` and stop them after ``start + steps`` batches."""

    def __init__(self, start: int, steps: int) -> None:
        self.start, self.stop = start, start + steps
        self.torch_prof: Any = None
        self.py_prof = cProfile.Profile()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.start:
            self.torch_prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.torch_prof.__enter__()
            self.py_prof.enable()
        elif batch_idx == self.stop:
            self.py_prof.disable()
            self.torch_prof.__exit__(None, None, None)


def main(argv: list[str] | None = None) -> None:
    """Profile sampled steps of one workload and print the two tables."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=WORKLOADS, default="mlp")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--every-n-steps", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    from lightning_health import HealthMonitor

    _quiet()
    torch.set_num_threads(NUM_THREADS)
    warmup = 3
    module, loader = make_workload(args.workload, num_batches=warmup + args.steps + 1)
    prof = _Profile(warmup, args.steps)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=warmup + args.steps + 1,
        logger=pl.loggers.TensorBoardLogger(save_dir="/tmp/lh-profile", name="tb"),
        callbacks=[prof, HealthMonitor(every_n_steps=args.every_n_steps, verbose=False)],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    print(prof.torch_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    out = io.StringIO()
    pstats.Stats(prof.py_prof, stream=out).sort_stats("cumulative").print_stats("lightning_health", args.top)
    print(out.getvalue())


if __name__ == "__main__":
    main()
