"""Each layer's usual gradient scale: the reference the scale-free explosion rule compares against.

Multiplying the loss by a constant (``reduction="sum"`` instead of ``"mean"``, a loss weight, a
different batch size under ``sum``) multiplies every activation gradient by that constant, so an
absolute gradient threshold gives different verdicts for the same training trajectory. A growth
factor does not: the explosion rule divides a layer's gradient std by its own usual level, the
median of its earlier readings (a median, so spikes do not set it).

Not its first readings alone: at initialisation gradients are often far below their level a few
hundred steps later, most of all behind a zero-initialised gate (a residual branch's last BatchNorm
at gamma 0, ReZero's alpha, a zero output projection), whose layers start at exactly 0 and open as
the gate learns. A BatchNorm ResNet trained with SGD grows its gradients ~5x from step 0 and then
spikes 30x for a batch: 140x its first readings, yet a healthy run. The median of the whole history
so far (thinned to at most :data:`KEEP` values, uniformly in time) follows the level the layer
settles at, while a real explosion (orders of magnitude, sustained) outruns it.

A layer whose gradient starts at (nearly) zero, e.g. the early layers of a deep net initialised too
small (vanishing at step 0), would grow "infinitely" from it while it merely recovers; its reference
is therefore never taken below ``floor_ratio`` (``Thresholds.baseline_floor``, 1/10) times the
output-side layer's (both scale with the loss, so this stays scale-free). Growing back to the output
side's level is recovery; only growth far past it is an explosion.

The same tracker on ``grad_gain`` (a depth stretch's gradient gain, see
:func:`~lightning_health.diagnosis.learning.depth_profile`) is what ``gradient_flow`` compares a gain
with: a stretch that has always shrunk the gradient 40x (a head's transform, a residual branch
against its skip path) is the architecture; one that starts shrinking it 40x more than it did is news.

The tracker is plain host state (floats per layer), saved with the monitor's checkpoint, and is
used in the same way by the live monitor and by the offline replay of logged curves.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

KEEP = 256
"""Earlier readings kept per layer; past it every other one is dropped and only every second new one kept."""


class GradBaseline:
    """Per layer, the median of the earlier finite, positive readings of ``metric`` (``grad_std``).

    ``samples``: how many earlier readings a layer needs before its level is used (one odd batch at
    the start is no level). The latest reading is not part of its own reference: :meth:`get` is the
    level *before* it, :meth:`previous` the reading just before it.

    Example:
        >>> b = GradBaseline(samples=3)
        >>> for g in (2.0, 4.0, 1e9, 5.0):
        ...     b.observe({"a": {"grad_std": g}})
        >>> b.get("a"), b.previous("a")
        (4.0, 1000000000.0)
    """

    def __init__(self, samples: int = 1, metric: str = "grad_std") -> None:
        self.samples = samples
        self.metric = metric
        self._seen: dict[str, list[float]] = {}  # earlier readings, thinned (the latest excluded)
        self._latest: dict[str, float] = {}
        self._previous: dict[str, float] = {}
        self._stride: dict[str, int] = {}  # keep every stride-th earlier reading (1 until KEEP is reached)
        self._count: dict[str, int] = {}
        self._median: dict[str, float] = {}  # cache of median(_seen[layer]); dropped when _seen changes
        self._read: set[str] = set()  # layers with a finite reading so far
        self._gated: set[str] = set()  # first reading exactly 0 and not yet opened (see `gated`)

    def observe(self, snapshot: Mapping[str, Mapping[str, float]]) -> None:
        """Fold in one step's readings ``{layer: {metric: value}}`` (only ``self.metric`` is read)."""
        for layer, readings in snapshot.items():
            g = readings.get(self.metric)
            if g is not None and g == 0 and layer not in self._read:
                self._gated.add(layer)
            if g is not None and math.isfinite(g):
                self._read.add(layer)
            if g is None or not math.isfinite(g) or g <= 0:
                continue
            if layer in self._latest:
                self._keep(layer, self._latest[layer])
                self._previous[layer] = self._latest[layer]
            self._latest[layer] = float(g)

    def _keep(self, layer: str, value: float) -> None:
        count = self._count[layer] = self._count.get(layer, 0) + 1
        stride = self._stride.setdefault(layer, 1)
        if (count - 1) % stride:
            return
        seen = self._seen.setdefault(layer, [])
        seen.append(value)
        self._median.pop(layer, None)
        if len(seen) > KEEP:
            del seen[1::2]
            self._stride[layer] = stride * 2

    def get(self, layer: str) -> float | None:
        """The layer's usual level before its latest reading; ``None`` until it has ``samples`` earlier ones."""
        seen = self._seen.get(layer)
        if not seen or self._count.get(layer, 0) < self.samples:
            return None
        if layer not in self._median:
            self._median[layer] = statistics.median(seen)
        return self._median[layer]

    def gated(self, layer: str) -> bool:
        """Whether ``layer`` read exactly 0 at its first reading and has not opened since.

        Exactly zero, not small: the layer sits behind a weight that is exactly 0 at initialisation
        (a residual branch's last BatchNorm at gamma 0, ReZero's alpha, a zero output projection,
        LoRA's B), by design. Its gradient grows as the gate learns; until it has once reached the
        level the rules call healthy (:meth:`open`), comparing it with the rest of the network says
        nothing. A deep net initialised too small starts small but not at 0: it is judged at once.
        """
        return layer in self._gated

    def open(self, layer: str) -> None:
        """``layer``'s gradient reached a healthy level: from now on it is judged like any other."""
        self._gated.discard(layer)

    def previous(self, layer: str) -> float | None:
        """The reading before the latest one (``None`` before the second reading)."""
        return self._previous.get(layer)

    def reference(self, layer: str, output_layer: str | None, floor_ratio: float) -> float | None:
        """The level a growth factor is taken against: the layer's own, floored by the output side's."""
        own = self.get(layer)
        out = self.get(output_layer) if output_layer is not None else None
        if own is None:
            return None
        return max(own, floor_ratio * out) if out is not None else own

    def state_dict(self) -> dict[str, Any]:
        return {
            "seen": {layer: list(values) for layer, values in self._seen.items()},
            "latest": dict(self._latest),
            "previous": dict(self._previous),
            "stride": dict(self._stride),
            "count": dict(self._count),
            "read": sorted(self._read),
            "gated": sorted(self._gated),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "seen" not in state:  # written before the usual levels: {layer: [its first readings]}
            state = {"seen": state, "count": {layer: len(values) for layer, values in state.items()}}
        self._seen = {str(k): [float(v) for v in values] for k, values in state["seen"].items()}
        self._median = {}
        self._latest = {str(k): float(v) for k, v in state.get("latest", {}).items()}
        self._previous = {str(k): float(v) for k, v in state.get("previous", {}).items()}
        self._stride = {str(k): int(v) for k, v in state.get("stride", {}).items()}
        self._count = {str(k): int(v) for k, v in state.get("count", {}).items()}
        self._read = {str(k) for k in state.get("read", self._seen)}
        self._gated = {str(k) for k in state.get("gated", ())}
