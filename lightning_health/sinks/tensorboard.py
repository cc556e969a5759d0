"""TensorBoard: scalars through the logger, histograms with ``add_histogram_raw`` from counts.

No raw activation reaches the host: histograms arrive as device-binned counts. NaN/Inf values are
counted separately (``add_histogram`` would raise on them) and out-of-range values sit in two open
end buckets, so nothing is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_health.sinks.base import Histogram
from lightning_health.sinks.generic import ScalarSink


def is_tensorboard_logger(logger: Any) -> bool:
    """True for Lightning's (or pytorch_lightning's) TensorBoardLogger."""
    return any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__)


def raw_histogram_args(hist: Histogram) -> dict[str, Any]:
    """Arguments for ``SummaryWriter.add_histogram_raw`` from our counts.

    TensorBoard buckets are ``(limit[i-1], limit[i]]``; the open ends get limits one bin-width
    beyond the edges so they stay visible without inventing a data range.
    """
    edges, counts = list(hist.edges), list(hist.counts[:-1])  # drop the nonfinite count
    left_pad = edges[1] - edges[0]
    right_pad = edges[-1] - edges[-2]
    limits = [edges[0], *edges[1:], edges[-1] + right_pad]
    # bucket 0 (below) is reported as (edges[0] - pad, edges[0]]
    centers = (
        [edges[0] - left_pad / 2] + [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])] + [edges[-1] + right_pad / 2]
    )
    num = sum(counts)
    used = [i for i, c in enumerate(counts) if c > 0]
    lo = edges[0] - left_pad if not used else (edges[0] - left_pad if used[0] == 0 else edges[used[0] - 1])
    hi = limits[-1] if not used else limits[used[-1]]
    return {
        "min": float(lo),
        "max": float(hi),
        "num": int(num),
        "sum": float(sum(c * x for c, x in zip(counts, centers))),
        "sum_squares": float(sum(c * x * x for c, x in zip(counts, centers))),
        "bucket_limits": [float(x) for x in limits],
        "bucket_counts": [float(c) for c in counts],
    }


class TensorBoardSink(ScalarSink):
    """Scalars via ``log_metrics`` plus ``health/activations/<layer>`` and ``health/gradients/<layer>``."""

    def write(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, Histogram]) -> None:
        super().write(step, scalars, histograms)
        writer = self.logger.experiment
        for tag, hist in histograms.items():
            args = raw_histogram_args(hist)
            if args["num"] > 0:
                writer.add_histogram_raw(tag, global_step=step, **args)
