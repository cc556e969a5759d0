"""The dashboard pieces that are not per-step scalars: findings text, the heatmap, the depth profile.

Written when they change or every few sampled steps, and once at the end of training; no work at all
without a sink that shows them. The two pictures cost ~0.1-0.3 s each to draw (matplotlib), more than
a whole sampled step, so a due re-render waits while it would take more than :data:`PICTURE_SHARE` of
the training time: dense sampling (bursts, ``every_n_steps=1``) does not pay for a picture per few steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from lightning_health._optional import installed
from lightning_health.monitor.record import Record
from lightning_health.sinks import SinkSet
from lightning_health.sinks.heatmap import render_heatmap

HEATMAP_TAG = "health/dead_fraction_heatmap"

PICTURE_SHARE = 0.02
"""The most of the wall time the re-rendered pictures may take: a due render waits until the last one's
cost is at most this share of the time since it ended. The final render at the end of training never waits."""


class PictureBudget:
    """When a due picture may be drawn: its last cost against the time since (see :data:`PICTURE_SHARE`).

    Example:
        >>> budget = PictureBudget(share=0.02)
        >>> budget.fits(now=0.0)  # nothing drawn yet
        True
        >>> budget.spent(start=0.0, end=0.5)
        >>> budget.fits(now=10.0), budget.fits(now=25.5)
        (False, True)
    """

    def __init__(self, share: float = PICTURE_SHARE) -> None:
        self.share = share
        self.cost = 0.0
        self.ended = 0.0

    def fits(self, now: float) -> bool:
        return self.cost <= self.share * (now - self.ended)

    def spent(self, start: float, end: float) -> None:
        self.cost, self.ended = end - start, end


class Publisher:
    """Findings when they change; the heatmap and depth profile every ``every`` sampled steps, within budget.

    Args:
        dashboard: whether to write these pieces at all (``HealthMonitor(dashboard=...)``).
        every: re-render the pictures every this many sampled steps at most; ``None``: never.
        clock: seconds, for the picture budget (``time.perf_counter``).
    """

    def __init__(self, dashboard: bool, every: int | None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.dashboard = dashboard
        self.every = every
        self.samples = 0
        self.due = False  # a re-render is owed: it was due and did not fit the budget yet
        self.budget = PictureBudget()
        self.clock = clock

    def __call__(self, sinks: SinkSet, record: Record, step: int, final: bool = False) -> None:
        if not self.dashboard or not sinks.sinks:
            return
        sinks.findings(step, record.findings.findings(), force=final)
        self.samples += not final
        if not self.every or not sinks.takes_images:
            return
        self.due = self.due or self.samples % self.every == 0
        start = self.clock()
        if final or (self.due and self.budget.fits(start)):
            curves = record.history.curves("dead_fraction")
            if curves:
                nonfinite = record.history.curves("nonfinite")
                sinks.image(step, HEATMAP_TAG, render_heatmap(curves, record.layers, nonfinite=nonfinite))
            self._profile(sinks, record, step)
            self.due = False
            self.budget.spent(start, self.clock())

    @staticmethod
    def _profile(sinks: SinkSet, record: Record, step: int) -> None:
        """The gradient-flow picture (needs matplotlib, the `plot` extra; skipped without it)."""
        from lightning_health.sinks.depth_profile import PROFILE_TAG, depth_profile_rgb

        curves = {metric: record.history.curves(metric) for metric in ("grad_norm", "act_rms")}
        if installed("matplotlib") and curves["grad_norm"]:
            sinks.image(step, PROFILE_TAG, depth_profile_rgb(curves, record.layers))
