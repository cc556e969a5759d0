"""The dashboard pieces that are not per-step scalars: findings text, the heatmap, the depth profile.

Written when they change or every few sampled steps, and once at the end of training; no work at all
without a sink that shows them.
"""

from __future__ import annotations

from lightning_health._optional import installed
from lightning_health.monitor.record import Record
from lightning_health.sinks import SinkSet
from lightning_health.sinks.heatmap import render_heatmap

HEATMAP_TAG = "health/dead_fraction_heatmap"


class Publisher:
    """Findings when they change; the heatmap and depth profile every ``every`` sampled steps.

    Args:
        dashboard: whether to write these pieces at all (``HealthMonitor(dashboard=...)``).
        every: re-render the pictures every this many sampled steps; ``None``: never.
    """

    def __init__(self, dashboard: bool, every: int | None) -> None:
        self.dashboard = dashboard
        self.every = every
        self.samples = 0

    def __call__(self, sinks: SinkSet, record: Record, step: int, final: bool = False) -> None:
        if not self.dashboard or not sinks.sinks:
            return
        sinks.findings(step, record.findings.findings(), force=final)
        self.samples += not final
        if self.every and sinks.takes_images and (final or self.samples % self.every == 0):
            curves = record.history.curves("dead_fraction")
            if curves:
                nonfinite = record.history.curves("nonfinite")
                sinks.image(step, HEATMAP_TAG, render_heatmap(curves, record.layers, nonfinite=nonfinite))
            self._profile(sinks, record, step)

    @staticmethod
    def _profile(sinks: SinkSet, record: Record, step: int) -> None:
        """The gradient-flow picture (needs matplotlib, the `plot` extra; skipped without it)."""
        from lightning_health.sinks.depth_profile import PROFILE_TAG, depth_profile_rgb

        curves = {metric: record.history.curves(metric) for metric in ("grad_norm", "act_rms")}
        if installed("matplotlib") and curves["grad_norm"]:
            sinks.image(step, PROFILE_TAG, depth_profile_rgb(curves, record.layers))
