"""Is each layer learning, and where does the gradient die? Host-side helpers the rules read.

- :func:`depth_profile`: the monitored layers in forward order, each with its activation RMS and
  activation-gradient norm, and the gain of the stretch that ends at it: ``act_gain`` (forward:
  this layer's RMS over the previous layer's) and ``grad_gain`` (backward, the way the gradient
  travels: the previous layer's gradient norm over this layer's). A gain below 1 shrinks the
  signal; the stretch where the gradient's gain collapses (or jumps) is where vanishing (or
  exploding) starts.
- :class:`UpdateWindow`: each module's last ``size`` judged update ratios, so ``stalled`` and
  ``unstable`` are judged on persistence, never on one step. Steps the GradScaler skipped and
  modules that got no gradient are not judged (their 0 update is not a symptom).

Standard library only, like the rest of :mod:`lightning_health.diagnosis`.

Example:
    >>> snap = {"a": {"act_rms": 1.0, "grad_norm": 1e-4}, "b": {"act_rms": 2.0, "grad_norm": 1e-1}}
    >>> depth_profile(["a", "b"], snap)["b"]
    {'act_rms': 2.0, 'grad_norm': 0.1, 'act_gain': 2.0, 'grad_gain': 0.001}
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
        return None
    return num / den


def depth_profile(order: Sequence[str], snapshot: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per layer in ``order`` (forward order): ``act_rms``, ``grad_norm`` and the gains into it.

    The first layer has no gain; a gain is left out where either side has no finite, positive reading.
    """
    out: dict[str, dict[str, float]] = {}
    previous: Mapping[str, float] | None = None
    for name in order:
        r = snapshot.get(name)
        if r is None:
            continue
        row = {key: r[key] for key in ("act_rms", "grad_norm") if key in r}
        if previous is not None:
            act_gain = _ratio(r.get("act_rms"), previous.get("act_rms"))
            grad_gain = _ratio(previous.get("grad_norm"), r.get("grad_norm"))
            if act_gain is not None:
                row["act_gain"] = act_gain
            if grad_gain is not None:
                row["grad_gain"] = grad_gain
        out[name] = row
        previous = r
    return out


def previous_layers(order: Sequence[str]) -> dict[str, str]:
    """``{layer: the monitored layer before it}`` in forward order (for the rules' messages)."""
    return {later: earlier for earlier, later in zip(order, order[1:])}


class UpdateWindow:
    """The last ``size`` judged ``update_ratio`` readings per module, and the statistics the rules read."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ratios: dict[str, deque[float]] = {}

    def add(self, readings: Mapping[str, Mapping[str, float]], skipped: bool = False) -> dict[str, dict[str, float]]:
        """Fold one sampled step in; per judged module, its window statistics.

        Args:
            readings: ``{module: {"update_ratio": .., "param_grad_norm": ..}}`` of this step.
            skipped: the optimizer step was skipped (AMP overflow): nothing is judged.

        Returns:
            ``{module: {"update_ratio_max", "update_ratio_min", "update_ratio_others", "update_ratio_full"}}``
            for every module with a full or filling window (``others``: the median window-max of
            the other modules, absent when no other module is judged).
        """
        if not skipped:
            for name, r in readings.items():
                ratio, grad = r.get("update_ratio"), r.get("param_grad_norm")
                if ratio is None or not math.isfinite(ratio):
                    continue
                if grad is None or not grad > 0:
                    self._ratios.pop(name, None)  # no gradient reached it: frozen or unused, not stalled
                    continue
                self._ratios.setdefault(name, deque(maxlen=self.size)).append(ratio)
        peaks = {name: max(values) for name, values in self._ratios.items() if values}
        out: dict[str, dict[str, float]] = {}
        for name, values in self._ratios.items():
            if name not in readings or "update_ratio" not in readings[name] or skipped:
                continue
            stats = {
                "update_ratio_max": max(values),
                "update_ratio_min": min(values),
                "update_ratio_full": float(len(values) >= self.size),
            }
            others = [peak for other, peak in peaks.items() if other != name]
            if others:
                stats["update_ratio_others"] = statistics.median(others)
            out[name] = stats
        return out

    def state_dict(self) -> dict[str, list[float]]:
        return {name: list(values) for name, values in self._ratios.items()}

    def load_state_dict(self, state: Mapping[str, Sequence[float]]) -> None:
        self._ratios = {name: deque((float(v) for v in values), maxlen=self.size) for name, values in state.items()}
