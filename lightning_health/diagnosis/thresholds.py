"""When a reading becomes a finding: every rule's numbers in one validated, overridable object."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """When a reading becomes a finding. Fractions are in [0, 1].

    Every default is free of the loss scale and of the layer width (see docs/findings.md): the
    gradient rules compare a layer with its own early baseline (``exploding_growth``) or with the
    output-side layer (``vanishing_ratio``, on gradient norms), and collapse compares each unit's
    spread with its layer's scale. The absolute gradient thresholds ``exploding_grad_std`` and
    ``vanishing_grad_std`` are off (``None``) unless set.

    Attributes:
        exploding_growth: ``exploding_gradient`` (critical) when a layer's gradient std exceeds this
            many times its usual level (the median of its earlier readings, once it has
            ``baseline_samples`` of them) at two sampled steps in a row, or ``exploding_growth**2``
            times at one.
        baseline_floor: a layer's baseline is never taken below this fraction of the output-side
            layer's, so a layer that started vanishing is not "exploding" as it recovers.
        exploding_grad_std: also call ``exploding_gradient`` above this absolute gradient std (off by default).
        vanishing_ratio: ``vanishing_gradient`` when a layer's gradient norm is below this fraction of
            the output-side layer's.
        vanishing_grad_std: when set, vanishing also needs the gradient std below this absolute value.
        collapsed: ``collapsed`` when more than this share of a layer's units are constant across the batch.
        collapse_unit_ratio: a unit is constant when its std across the batch is <= this times the layer's RMS.
        collapse_std: the fallback collapse rule on the pooled ``act_std`` (used only where no
            ``collapsed_fraction`` was read, e.g. event files of older runs); ``None`` turns it off.
        stalled_update_ratio: ``stalled`` when a module's largest update ratio over the window is below this...
        stalled_ratio: ... and below this fraction of the other modules' (the median of their window maxima).
        unstable_update_ratio: ``unstable`` when a module's smallest update ratio over the window is above this
            (a module grown from all zeros: only from ``1 / unstable_update_ratio**2`` steps on).
        flow_gain: ``gradient_flow`` when a stretch's gradient gain leaves ``[1/flow_gain, flow_gain]`` and
            a vanishing/exploding gradient starts there or the gain moved ``flow_gain``x from its usual gain.

    Example:
        >>> Thresholds(dead_warning=0.1).dead_critical
        0.5
    """

    dead_warning: float = 0.2
    dead_critical: float = 0.5
    saturation: float = 0.5
    inactive_warning: float = 0.5
    vanishing_grad_std: float | None = None
    vanishing_ratio: float = 1e-2
    exploding_grad_std: float | None = None
    exploding_growth: float = 100.0
    baseline_samples: int = 1
    baseline_floor: float = 0.1
    collapse_std: float | None = 1e-3
    collapsed: float = 0.5
    collapse_unit_ratio: float = 1e-3
    stalled_update_ratio: float = 1e-5
    stalled_ratio: float = 1e-2
    unstable_update_ratio: float = 0.1
    flow_gain: float = 10.0
    entropy_floor: float = 0.1  # nats: a layer whose mean head entropy is below this attends nearly one-hot
    logit_bound: float = 100.0  # attn_logit_max past this (Kimi K2's QK-Clip cap; healthy runs here stay < 35)
    massive_growth: float = 4.0  # massive_ratio (>= 100, Sun et al.'s criterion) this many times its lowest

    def __post_init__(self) -> None:
        fractions = (
            "dead_warning", "dead_critical", "saturation", "vanishing_ratio", "inactive_warning", "stalled_ratio",
            "collapsed", "collapse_unit_ratio", "baseline_floor",
        )  # fmt: skip
        for name in fractions:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"Expected `{name}` to be a fraction in [0, 1], got {value!r}")
        for name in ("vanishing_grad_std", "exploding_grad_std", "collapse_std"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise ValueError(f"Expected `{name}` to be a positive number or None, got {value!r}")
        positives = (
            "stalled_update_ratio", "unstable_update_ratio", "flow_gain", "entropy_floor", "logit_bound",
            "massive_growth",
        )  # fmt: skip
        for name in positives:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Expected `{name}` to be a positive number, got {value!r}")
        growth = self.exploding_growth
        if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not growth > 1:
            raise ValueError(f"Expected `exploding_growth` to be a number > 1, got {growth!r}")
        samples = self.baseline_samples
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"Expected `baseline_samples` to be a positive int, got {samples!r}")
        if self.dead_critical < self.dead_warning:
            raise ValueError(
                f"Expected `dead_critical` ({self.dead_critical}) to be >= `dead_warning` ({self.dead_warning})"
            )
        if self.flow_gain <= 1:
            raise ValueError(f"Expected `flow_gain` to be > 1 (a factor either way), got {self.flow_gain!r}")
