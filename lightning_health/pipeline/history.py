"""Every reading of the run, per metric and layer, in bounded memory, the whole run evenly kept.

Each series keeps the points whose index (the n-th reading of that series) is a multiple of its
*stride*, plus its latest reading. The stride starts at 1; when a series holds more than its cap,
the stride doubles and every other kept point goes, so the kept points always span the run from its
first reading to its latest at one even spacing (every ``stride``-th reading), however long it is.

Size: a series holds at most ``cap + 1`` points, ``cap = min(max_points, max(16, max_total_points //
series))``: the run's total is bounded too (``max_total_points``, default 1,000,000, over every
metric and layer; each point costs ~120 bytes in memory and ~20 bytes in a checkpoint, so ~120 MB and
~20 MB at most), and a deep net's series get shorter caps instead of growing the run without bound.
With 300 monitored layers (~4500 series) each series keeps ~220 points.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MAX_TOTAL_POINTS = 1_000_000
MIN_POINTS = 16


class _Series:
    """One curve: the on-grid points (every ``stride``-th reading) and possibly one latest off-grid point."""

    __slots__ = ("count", "points", "stride")

    def __init__(self, points: list[tuple[int, float]] | None = None, stride: int = 1, count: int | None = None):
        self.points = points or []
        self.stride = stride
        self.count = len(self.points) if count is None else count  # readings offered so far

    def last_off_grid(self) -> bool:
        return self.count > 0 and (self.count - 1) % self.stride != 0

    def add(self, step: int, value: float, cap: int) -> None:
        if self.points and self.points[-1][0] == step:
            self.points[-1] = (step, value)  # a re-logged step (e.g. resumed mid-step) replaces the old point
            return
        if self.last_off_grid():
            self.points.pop()  # the previous latest reading was not on the grid: the new one replaces it
        self.points.append((step, value))
        self.count += 1
        self.thin(cap)

    def thin(self, cap: int) -> None:
        """Double the stride until at most ``cap`` points sit on the grid; the latest reading stays."""
        while True:
            off = self.last_off_grid()
            grid = self.points[:-1] if off else self.points
            if len(grid) <= cap:
                return
            latest = self.points[-1]
            self.stride *= 2
            kept = grid[::2]  # grid point j is reading j*stride: the even ones lie on the doubled grid
            self.points = kept if kept[-1] is latest else [*kept, latest]


class History:
    """``{metric: {layer: [(step, value), ...]}}`` with even thinning and a per-run point budget.

    Args:
        max_points: the most points a series keeps on its grid (plus its latest reading).
        max_total_points: the most points of the whole run; per-series caps shrink to fit it (never
            below 16 points per series).
    """

    def __init__(self, max_points: int = 4096, max_total_points: int = MAX_TOTAL_POINTS) -> None:
        if max_points < MIN_POINTS:
            raise ValueError(f"Expected `max_points` to be >= {MIN_POINTS}, got {max_points}")
        self.max_points = max_points
        self.max_total_points = max_total_points
        self._series: dict[str, dict[str, _Series]] = {}
        self._count = 0  # series in the run
        self._cap = max_points

    def cap(self) -> int:
        """The current per-series cap (``max_points``, or less for runs with many series)."""
        return self._cap

    def _new_series(self) -> _Series:
        self._count += 1
        self._cap = min(self.max_points, max(MIN_POINTS, self.max_total_points // self._count))
        return _Series()

    def add(self, step: int, metric: str, layer: str, value: float) -> None:
        per_layer = self._series.setdefault(metric, {})
        series = per_layer.get(layer)
        if series is None:
            series = per_layer[layer] = self._new_series()
        series.add(step, value, self._cap)

    def total_points(self) -> int:
        return sum(len(s.points) for per in self._series.values() for s in per.values())

    def curves(self, metric: str) -> dict[str, list[tuple[int, float]]]:
        """A copy of every series of ``metric`` (empty dict if it was never logged)."""
        return {layer: list(s.points) for layer, s in self._series.get(metric, {}).items()}

    def metrics(self) -> list[str]:
        return sorted(self._series)

    def latest(self, layer: str) -> dict[str, float]:
        """The latest value of every metric for ``layer``."""
        out = {}
        for metric, per_layer in self._series.items():
            series = per_layer.get(layer)
            if series is not None and series.points:
                out[metric] = series.points[-1][1]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "series": {m: {k: [[s, v] for s, v in x.points] for k, x in p.items()} for m, p in self._series.items()},
            "grid": {m: {k: [x.stride, x.count] for k, x in per.items()} for m, per in self._series.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        series = state.get("series", state) if "grid" in state else state  # older checkpoints: series only
        grid = state.get("grid", {}) if "grid" in state else {}
        self._series, self._count = {}, 0
        for metric, per in series.items():
            for layer, points in per.items():
                stride, count = grid.get(metric, {}).get(layer, [1, len(points)])
                new = self._new_series()
                new.points = [(int(s), float(v)) for s, v in points]
                new.stride, new.count = int(stride), int(count)
                self._series.setdefault(metric, {})[layer] = new
        for per in self._series.values():
            for s in per.values():
                s.thin(self._cap)
