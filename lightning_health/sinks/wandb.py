"""Weights & Biases through Lightning's ``WandbLogger``: scalars, histograms, heatmap, findings table,
config and summary, so runs can be filtered, grouped and compared in the W&B UI.

Everything goes through the logger's ``log_metrics`` (as Lightning's own ``log_table``/``log_image``
do), which adds ``trainer/global_step`` to each record; ``health/*`` is defined against that step,
so health panels line up with the loss curves. W&B draws one chart per logged key, so the sink also
logs ``health/charts/<metric>``: one ``wandb.plot.line_series`` per key reading with every layer
overlaid (a line per layer, named in the legend), refreshed every ``chart_every`` sampled steps and at
the end of training. Only rank zero has sinks (see ``HealthMonitor.setup``),
and nothing here talks to other ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_health._optional import installed
from lightning_health.sinks.base import Histogram, SinkBase
from lightning_health.sinks.format import FINDING_COLUMNS, finding_rows

if TYPE_CHECKING:
    import numpy as np

    from lightning_health.diagnosis import Finding

STEP_METRIC = "trainer/global_step"
CONFIG_KEY = "lightning_health"
CHART_PREFIX = "health/charts/"
#: ``(metric, chart title)`` of the overlaid per-layer charts.
CHART_METRICS = (
    ("dead_fraction", "dead fraction per layer"),
    ("grad_std", "gradient std per layer"),
    ("act_std", "activation std per layer"),
)


def is_wandb_logger(logger: Any) -> bool:
    """True for Lightning's (or pytorch_lightning's) WandbLogger."""
    return any(cls.__name__ == "WandbLogger" for cls in type(logger).__mro__)


def _wandb() -> Any:
    if not installed("wandb"):
        raise ModuleNotFoundError("W&B output needs `wandb`: pip install 'lightning_health[wandb]'")
    import wandb

    return wandb


MAX_BINS = 512  # wandb.Histogram.MAX_LENGTH: a longer histogram raises


def rebin(edges: Sequence[float], counts: Sequence[float], max_bins: int = MAX_BINS) -> tuple[list[float], list[float]]:
    """Merge adjacent bins (summing their counts) until at most ``max_bins`` remain; no count is lost.

    ``edges`` has one more value than ``counts``. Groups of ``k = ceil(len(counts) / max_bins)`` bins
    merge, the first and last bins (the open ends) kept apart so out-of-range counts stay visible.
    """
    n = len(counts)
    if n <= max_bins:
        return list(edges), list(counts)
    inner = n - 2
    k = -(-inner // (max_bins - 2))
    new_edges, new_counts = [edges[0], edges[1]], [counts[0]]
    for start in range(1, n - 1, k):
        stop = min(start + k, n - 1)
        new_counts.append(sum(counts[start:stop]))
        new_edges.append(edges[stop])
    new_counts.append(counts[-1])
    new_edges.append(edges[-1])
    return new_edges, new_counts


def wandb_histogram(hist: Histogram) -> Any:
    """A ``wandb.Histogram`` from device-binned counts: the ``B`` bins plus one open-end bin each side.

    The nonfinite count is left out (it is the ``nonfinite`` scalar). W&B takes at most 512 bins:
    with more (``histogram_bins >= 511``) adjacent bins are summed (:func:`rebin`), so the sink keeps
    working whatever ``histogram_bins`` the other loggers get.
    """
    import numpy as np

    edges = list(hist.edges)
    edges = [edges[0] - (edges[1] - edges[0]), *edges, edges[-1] + (edges[-1] - edges[-2])]
    edges, counts = rebin(edges, list(hist.counts[:-1]))
    return _wandb().Histogram(np_histogram=(np.asarray(counts, dtype=np.float64), np.asarray(edges, dtype=np.float64)))


class WandbSink(SinkBase):
    """Writes the health of a run into the logger's W&B run."""

    takes_images = True

    def __init__(self, logger: Any, chart_every: int = 10, max_points: int = 500) -> None:
        self.logger = logger
        self.chart_every = chart_every
        self.max_points = max_points
        self._series: dict[str, dict[str, list[tuple[int, float]]]] = {metric: {} for metric, _ in CHART_METRICS}
        self._writes = 0

    @property
    def run(self) -> Any:
        return self.logger.experiment

    def start(self, settings: Mapping[str, Any], layers: Sequence[str]) -> None:
        run = self.run
        if hasattr(run, "define_metric"):  # Lightning defines "*" the same way; be explicit for health/*
            run.define_metric(STEP_METRIC)
            run.define_metric("health/*", step_metric=STEP_METRIC, step_sync=True)
        run.config.update({CONFIG_KEY: {**settings, "layers": list(layers)}}, allow_val_change=True)

    def write(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, Histogram]) -> None:
        record: dict[str, Any] = dict(scalars)
        for tag, hist in histograms.items():
            if sum(hist.counts[:-1]) > 0:
                record[tag] = wandb_histogram(hist)
        self._remember(step, scalars)
        self._writes += 1
        if self._writes % self.chart_every == 0:
            record.update(self.charts())
        if record:
            self.logger.log_metrics(record, step=step)

    def _remember(self, step: int, scalars: Mapping[str, float]) -> None:
        for metric, per_layer in self._series.items():
            start = f"health/{metric}/"
            for tag, value in scalars.items():
                if tag.startswith(start):
                    points = per_layer.setdefault(tag[len(start) :], [])
                    points.append((step, value))
                    if len(points) > self.max_points:  # keep every other older point: bounded, whole run
                        points[:] = points[: -self.max_points // 2 : 2] + points[-self.max_points // 2 :]

    def charts(self) -> dict[str, Any]:
        """``{"health/charts/<metric>": wandb.plot.line_series}`` for the key readings seen so far."""
        import math

        wandb = _wandb()
        out = {}
        for metric, title in CHART_METRICS:
            per_layer = {layer: points for layer, points in self._series[metric].items() if points}
            if not per_layer:
                continue
            out[CHART_PREFIX + metric] = wandb.plot.line_series(
                xs=[[s for s, _ in points] for points in per_layer.values()],
                ys=[[v if math.isfinite(v) else None for _, v in points] for points in per_layer.values()],
                keys=list(per_layer),
                title=title,
                xname="trainer/global_step",
            )
        return out

    def findings(self, step: int, findings: Sequence[Finding]) -> None:
        table = _wandb().Table(columns=list(FINDING_COLUMNS), data=finding_rows(findings))
        self.logger.log_metrics({"health/findings": table}, step=step)

    def image(self, step: int, tag: str, rgb: np.ndarray) -> None:
        what = "dead fraction per layer (rows) over sampled steps" if "heatmap" in tag else tag.split("/")[-1]
        image = _wandb().Image(rgb, caption=f"{what}, up to step {step}")
        self.logger.log_metrics({tag: image}, step=step)

    def finish(self, step: int, summary: Mapping[str, Any]) -> None:
        charts = self.charts()
        if charts:
            self.logger.log_metrics(charts, step=step)
        self.run.summary.update(dict(summary))
