"""Is each layer learning, and where does the gradient die? Host-side helpers the rules read.

- :func:`depth_profile`: the monitored layers in forward order, each with its activation RMS and
  activation-gradient norm, and the gain of the stretch that ends at it: ``act_gain`` (forward:
  this layer's RMS over the previous layer's) and ``grad_gain`` (backward, the way the gradient
  travels: the previous layer's gradient norm over this layer's). A gain below 1 shrinks the
  signal; the stretch where the gradient's gain collapses (or jumps) is where vanishing (or
  exploding) starts.
- :class:`UpdateWindow`: each module's last ``size`` judged update ratios, so ``stalled`` and
  ``unstable`` are judged on persistence, never on one step. Steps the GradScaler skipped and
  modules that got no gradient are not judged (their 0 update is not a symptom). A module whose
  weights were all zero when first read (a zero-initialised bias or projection) is marked with the
  step it was zero at: its weights are nothing but its own accumulated updates, so its ratio falls
  only like ``1/k`` (steady steps) to ``1/sqrt(k)`` (noisy ones) after ``k`` steps, whatever the
  learning rate; ``unstable`` waits until that floor is under its threshold.

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
from typing import Any


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
        self._zero_at: dict[str, int] = {}  # module -> the step its weights were all zero at
        self._gated_at: dict[str, int] = {}  # module -> the step of its first reading, when its gradient was exactly 0
        self._graded: set[str] = set()  # modules with a gradient reading so far

    def add(
        self, readings: Mapping[str, Mapping[str, float]], skipped: bool = False, step: int = 0
    ) -> dict[str, dict[str, float]]:
        """Fold one sampled step in; per judged module, its window statistics.

        Args:
            readings: ``{module: {"update_ratio": .., "param_grad_norm": .., "param_norm": ..}}`` of this step.
            skipped: the optimizer step was skipped (AMP overflow): nothing is judged.
            step: the global step of the readings.

        Returns:
            ``{module: {"update_ratio_max", "update_ratio_min", "update_ratio_others", "update_ratio_full"}}``
            for every module with a full or filling window (``others``: the median window-max of
            the other modules, absent when no other module is judged), plus ``update_steps_from_zero``
            for a module that was all zeros when first read.
        """
        for name, r in readings.items():
            norm = r.get("param_norm")
            if norm is not None and norm == 0 and name not in self._zero_at:
                self._zero_at[name] = step
            grad = r.get("param_grad_norm")
            if grad is not None and name not in self._graded:
                self._graded.add(name)
                if grad == 0:
                    self._gated_at[name] = step
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
            if name in self._zero_at:
                stats["update_steps_from_zero"] = float(step - self._zero_at[name])
            if name in self._gated_at:
                stats["update_steps_from_gate"] = float(step - self._gated_at[name])
            out[name] = stats
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "ratios": {name: list(values) for name, values in self._ratios.items()},
            "zero_at": dict(self._zero_at),
            "gated_at": dict(self._gated_at),
            "graded": sorted(self._graded),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ratios = state.get("ratios")
        if not isinstance(ratios, Mapping):  # an older checkpoint: {module: [ratios]}
            ratios, zero_at = state, {}
        else:
            zero_at = state.get("zero_at", {})
        self._ratios = {name: deque((float(v) for v in values), maxlen=self.size) for name, values in ratios.items()}
        self._zero_at = {str(name): int(at) for name, at in zero_at.items()}
        gated_at = state.get("gated_at", {}) if isinstance(state.get("ratios"), Mapping) else {}
        self._gated_at = {str(name): int(at) for name, at in gated_at.items()}
        self._graded = set(self._ratios) | set(self._gated_at) | {str(n) for n in state.get("graded", ())}
