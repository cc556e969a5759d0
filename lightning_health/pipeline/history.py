"""Every reading of the run, per metric and layer, in bounded memory.

Each series keeps at most ``max_points`` points. When a series fills up, its older half is thinned
to every other point, so the first reading, the most recent ones at full resolution and an evenly
thinned past are always there; memory stays ``O(metrics x layers x max_points)`` however long the
run is.
"""

from __future__ import annotations

from collections.abc import Mapping


class History:
    """``{metric: {layer: [(step, value), ...]}}`` with compaction."""

    def __init__(self, max_points: int = 4096) -> None:
        if max_points < 16:
            raise ValueError(f"Expected `max_points` to be >= 16, got {max_points}")
        self.max_points = max_points
        self._series: dict[str, dict[str, list[tuple[int, float]]]] = {}

    def add(self, step: int, metric: str, layer: str, value: float) -> None:
        series = self._series.setdefault(metric, {}).setdefault(layer, [])
        if series and series[-1][0] == step:
            series[-1] = (step, value)  # a re-logged step (e.g. resumed mid-step) replaces the old point
            return
        series.append((step, value))
        if len(series) > self.max_points:
            half = len(series) // 2
            series[:half] = series[:half:2]

    def curves(self, metric: str) -> dict[str, list[tuple[int, float]]]:
        """A copy of every series of ``metric`` (empty dict if it was never logged)."""
        return {layer: list(points) for layer, points in self._series.get(metric, {}).items()}

    def metrics(self) -> list[str]:
        return sorted(self._series)

    def latest(self, layer: str) -> dict[str, float]:
        """The latest value of every metric for ``layer``."""
        out = {}
        for metric, per_layer in self._series.items():
            points = per_layer.get(layer)
            if points:
                out[metric] = points[-1][1]
        return out

    def state_dict(self) -> dict[str, dict[str, list[list[float]]]]:
        return {m: {layer: [[s, v] for s, v in pts] for layer, pts in per.items()} for m, per in self._series.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, list[list[float]]]]) -> None:
        self._series = {
            m: {layer: [(int(s), float(v)) for s, v in pts] for layer, pts in per.items()} for m, per in state.items()
        }
