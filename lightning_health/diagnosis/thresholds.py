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

    def __post_init__(self) -> None:
        for name in (
            "dead_warning",
            "dead_critical",
            "saturation",
            "vanishing_ratio",
            "inactive_warning",
            "stalled_ratio",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"Expected `{name}` to be a fraction in [0, 1], got {value!r}")
        for name in ("vanishing_grad_std", "exploding_grad_std", "collapse_std", "stalled_update_ratio",
                     "unstable_update_ratio", "flow_gain"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Expected `{name}` to be a positive number, got {value!r}")
        if self.dead_critical < self.dead_warning:
            raise ValueError(
                f"Expected `dead_critical` ({self.dead_critical}) to be >= `dead_warning` ({self.dead_warning})"
            )
        if self.flow_gain <= 1:
            raise ValueError(f"Expected `flow_gain` to be > 1 (a factor either way), got {self.flow_gain!r}")
