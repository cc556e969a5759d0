"""Per-layer fixed cost: a sampled step of a deep, narrow MLP against the number of monitored layers.

Issue 17.6: a sampled step costs about the same per monitored layer whatever the layer's size,
so a deep narrow net pays for layer count, not for data. This benchmark isolates that cost: MLPs
of width 64, batch 64, with 10, 30 and 100 ReLU layers (each one monitored), run under
``HealthMonitor(every_n_steps=1)`` and without a monitor, interleaved, in one process. The
sampled-step extra (median step with the monitor minus median step without) is fitted as
``fixed + per_layer * layers`` by least squares.

The tensors are tiny (64 x 64 floats), so the extra is almost all per-call overhead: Python in
the hooks and the step-end pipeline, and the fixed cost of each small torch op.

Run: ``python -m benchmarks.per_layer [--layers 10,30,100] [--steps 30] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from benchmarks.harness import NUM_THREADS, _quiet
from benchmarks.workloads import MLP


class _Stamps(Callback):
    """``perf_counter`` at every ``on_train_batch_start``: a step is the gap to the next one."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.stamps.append(time.perf_counter())


def deep_mlp(layers: int, width: int = 64) -> MLP:
    """An MLP of ``layers`` hidden ReLU layers of ``width`` units (each ReLU is a monitored layer)."""
    torch.manual_seed(0)
    return MLP(width=width, depth=layers, in_features=width, classes=10)


def median_step_ms(layers: int, monitored: bool, steps: int, warmup: int = 3) -> float:
    """Median step time of one fit, in ms."""
    from lightning_health import HealthMonitor

    x = torch.randn(64 * 4, 64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (64 * 4,), generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)
    stamps = _Stamps()
    callbacks: list[Callback] = [stamps]
    if monitored:
        callbacks.append(HealthMonitor(every_n_steps=1, verbose=False))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=warmup + steps + 1,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(deep_mlp(layers), loader)
    gaps = [b - a for a, b in zip(stamps.stamps, stamps.stamps[1:])][warmup:]
    return statistics.median(gaps) * 1e3


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of ``ys`` against ``xs``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def run(layer_counts: Sequence[int], steps: int, repeats: int) -> str:
    """Time every depth with and without the monitor, interleaved; the markdown table and the fit."""
    extra: dict[int, list[float]] = {n: [] for n in layer_counts}
    base: dict[int, list[float]] = {n: [] for n in layer_counts}
    for _ in range(repeats):
        for n in layer_counts:
            base[n].append(median_step_ms(n, False, steps))
            extra[n].append(median_step_ms(n, True, steps) - base[n][-1])
    rows = [
        "| monitored layers | step without monitor (ms) | sampled-step extra (ms) | extra per layer (ms) |",
        "|---:|---:|---:|---:|",
    ]
    medians = {n: statistics.median(v) for n, v in extra.items()}
    for n in layer_counts:
        rows.append(f"| {n} | {statistics.median(base[n]):.2f} | {medians[n]:.2f} | {medians[n] / n:.3f} |")
    fixed, per_layer = fit_line(list(medians), list(medians.values()))
    rows.append("")
    rows.append(f"Fit: sampled-step extra = {fixed:.2f} ms + {per_layer:.3f} ms x layers.")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.per_layer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="10,30,100", help="comma-separated layer counts")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per fit")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=NUM_THREADS)
    args = parser.parse_args(argv)
    _quiet()
    torch.set_num_threads(args.threads)
    counts = [int(n) for n in args.layers.split(",") if n.strip()]
    print(run(counts, args.steps, args.repeats))


if __name__ == "__main__":
    main()
