"""Each layer's early-run gradient scale: the baseline the scale-free explosion rule compares against.

Multiplying the loss by a constant (``reduction="sum"`` instead of ``"mean"``, a loss weight, a
different batch size under ``sum``) multiplies every activation gradient by that constant, so an
absolute gradient threshold gives different verdicts for the same training trajectory. A growth
factor does not: the explosion rule divides a layer's gradient std by its own baseline, the median
of its first ``samples`` finite readings (a median, so one odd batch does not set it).

A layer whose gradient starts at (nearly) zero, e.g. a residual branch behind a zero-initialised
output projection, or the early layers of a deep net initialised too small (vanishing at step 0),
would grow "infinitely" from it while it merely recovers; its baseline is therefore never taken
below ``floor_ratio`` (``Thresholds.baseline_floor``, 1/10) times the output-side layer's baseline
(both scale with the loss, so this stays scale-free). Growing back to the output side's level is
recovery; only growth far past it is an explosion.

The same tracker on ``grad_gain`` (a depth stretch's gradient gain, see
:func:`~lightning_health.diagnosis.learning.depth_profile`) is what ``gradient_flow`` compares a gain
with: a stretch that has shrunk the gradient 40x since step 0 (a head's transform, a residual branch
against its skip path) is the architecture; one that starts shrinking it 40x more than it did is news.

The tracker is plain host state (floats per layer), saved with the monitor's checkpoint, and is
used in the same way by the live monitor and by the offline replay of logged curves.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping


class GradBaseline:
    """The median of each layer's first ``samples`` finite, positive readings of ``metric`` (``grad_std``).

    Example:
        >>> b = GradBaseline(samples=3)
        >>> b.observe({"a": {"grad_std": 2.0}}); b.observe({"a": {"grad_std": 4.0}})
        >>> b.observe({"a": {"grad_std": 1e9}}); b.observe({"a": {"grad_std": 5.0}})
        >>> b.get("a")
        4.0
    """

    def __init__(self, samples: int = 5, metric: str = "grad_std") -> None:
        self.samples = samples
        self.metric = metric
        self._seen: dict[str, list[float]] = {}

    def observe(self, snapshot: Mapping[str, Mapping[str, float]]) -> None:
        """Fold in one step's readings ``{layer: {metric: value}}`` (only ``self.metric`` is read)."""
        for layer, readings in snapshot.items():
            g = readings.get(self.metric)
            if g is None or not math.isfinite(g) or g <= 0:
                continue
            seen = self._seen.setdefault(layer, [])
            if len(seen) < self.samples:
                seen.append(float(g))

    def get(self, layer: str) -> float | None:
        """The layer's own baseline, or ``None`` before its first finite reading."""
        seen = self._seen.get(layer)
        return statistics.median(seen) if seen else None

    def reference(self, layer: str, output_layer: str | None, floor_ratio: float) -> float | None:
        """The baseline a growth factor is taken against: the layer's own, floored by the output side's."""
        own = self.get(layer)
        out = self.get(output_layer) if output_layer is not None else None
        if own is None:
            return None
        return max(own, floor_ratio * out) if out is not None else own

    def state_dict(self) -> dict[str, list[float]]:
        return {layer: list(values) for layer, values in self._seen.items()}

    def load_state_dict(self, state: Mapping[str, list[float]]) -> None:
        self._seen = {str(layer): [float(v) for v in values] for layer, values in state.items()}
