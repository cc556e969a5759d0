"""What every rule sees besides one layer's readings, and the shape of what it returns.

Shared by the rule modules (:mod:`~lightning_health.diagnosis.rules` for one layer's readings,
:mod:`~lightning_health.diagnosis.learning_rules`, :mod:`~lightning_health.diagnosis.attention_rules`).
Standard library only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from lightning_health.diagnosis.baseline import GradBaseline
from lightning_health.diagnosis.findings import Severity
from lightning_health.diagnosis.thresholds import Thresholds


@dataclasses.dataclass(frozen=True)
class Context:
    """What a rule may know besides one layer's readings."""

    step: int
    thresholds: Thresholds
    rectifiers: set[str] | None
    smooth_rectifiers: set[str]
    output_layer: str | None
    reference_grad_std: float | None
    window: int | None
    baseline: GradBaseline | None = None
    reference_grad_norm: float | None = None
    previous: Mapping[str, str] = dataclasses.field(default_factory=dict)  # layer -> the one before it
    gain_baseline: GradBaseline | None = None  # each stretch's usual grad_gain
    gradient_layers: frozenset[str] = frozenset()  # layers with a vanishing/exploding hit at this step
    heads: frozenset[str] = frozenset()  # the model's output layers (capture/heads.py)


GRADIENT_READINGS = ("grad_std", "grad_max", "grad_norm", "grad_nonfinite")
"""What a step the GradScaler skipped leaves out of its diagnosis (its inf gradients are AMP at work)."""

Hit = tuple[str, Severity, str, float]  # kind, severity, message, value
Rule = Callable[[str, Mapping[str, float], Context], tuple[set[str], list[Hit]]]
"""A rule reads one layer's finite readings; it returns the kinds it checked and the hits it found."""


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"
