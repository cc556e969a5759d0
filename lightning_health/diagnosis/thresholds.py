"""When a reading becomes a finding: every rule's numbers in one validated, overridable object."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """When a reading becomes a finding. Fractions are in [0, 1].

    Example:
        >>> Thresholds(dead_warning=0.1).dead_critical
        0.5
    """

    dead_warning: float = 0.2
    dead_critical: float = 0.5
    saturation: float = 0.3
    inactive_warning: float = 0.5
    vanishing_grad_std: float = 1e-4
    vanishing_ratio: float = 1e-2
    exploding_grad_std: float = 10.0
    collapse_std: float = 1e-3
    stalled_update_ratio: float = 1e-5
    stalled_ratio: float = 1e-2
    unstable_update_ratio: float = 0.1
    flow_gain: float = 10.0
    entropy_floor: float = 0.1  # nats: a layer's lowest head below this attends nearly one-hot
    entropy_drop: float = 0.1  # ... or below this fraction of its own earlier peak
    logit_bound: float = 50.0  # attn_logit_max past this (exp(50) ~ 5e21: one-hot in float32)
    logit_growth: float = 4.0  # ... or this many times its own lowest reading,
    logit_growth_floor: float = 20.0  # once it is at least this large
    massive_growth: float = 4.0  # massive_ratio (>= 100, Sun et al.'s criterion) this many times its lowest

    def __post_init__(self) -> None:
        fractions = (
            "dead_warning", "dead_critical", "saturation", "vanishing_ratio", "inactive_warning", "stalled_ratio",
            "entropy_drop",
        )  # fmt: skip
        for name in fractions:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"Expected `{name}` to be a fraction in [0, 1], got {value!r}")
        positives = (
            "vanishing_grad_std", "exploding_grad_std", "collapse_std", "stalled_update_ratio", "unstable_update_ratio",
            "flow_gain", "entropy_floor", "logit_bound", "logit_growth", "logit_growth_floor", "massive_growth",
        )  # fmt: skip
        for name in positives:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Expected `{name}` to be a positive number, got {value!r}")
        if self.dead_critical < self.dead_warning:
            raise ValueError(
                f"Expected `dead_critical` ({self.dead_critical}) to be >= `dead_warning` ({self.dead_warning})"
            )
        if self.flow_gain <= 1:
            raise ValueError(f"Expected `flow_gain` to be > 1 (a factor either way), got {self.flow_gain!r}")
