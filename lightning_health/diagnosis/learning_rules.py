"""Rules on whether a layer is learning: where the gradient's flow breaks, stalled and unstable updates.

See :mod:`lightning_health.diagnosis.rules` for what each rule says and its default, and
:mod:`lightning_health.diagnosis.learning` for the readings they judge.
"""

from __future__ import annotations

from collections.abc import Mapping

from lightning_health.diagnosis.context import Context, Hit


def gradient_flow_rule(layer: str, r: Mapping[str, float], ctx: Context) -> tuple[set[str], list[Hit]]:
    gain = r.get("grad_gain")
    if gain is None or layer in ctx.heads:  # the stretch into a head carries the loss's own derivative
        return set(), []
    limit = ctx.thresholds.flow_gain
    if 1 / limit <= gain <= limit:
        return {"gradient_flow"}, []
    earlier = ctx.previous.get(layer)
    if earlier is not None and ctx.baseline is not None and ctx.baseline.gated(earlier):
        return {"gradient_flow"}, []  # the stretch into a gate initialised at 0 that has not opened yet
    base = ctx.gain_baseline.get(layer) if ctx.gain_baseline is not None else None
    moved = base is not None and (gain <= 0 or not 1 / limit <= gain / base <= limit)
    located = earlier is not None and earlier in ctx.gradient_layers
    if ctx.gain_baseline is not None and not (moved or located):
        return {"gradient_flow"}, []  # the stretch has always done this: the architecture, not a symptom
    before = earlier or "the layer before it"
    since = f" (usually {base:.3g}x)" if moved and base is not None else ""
    if gain <= 0:
        message = f"no gradient gets back from {layer} to {before}: it stops entirely on the way"
    elif gain < 1:
        message = f"gradient norm shrinks {1 / gain:.3g}x on its way back from {layer} to {before}{since}"
    else:
        message = f"gradient norm grows {gain:.3g}x on its way back from {layer} to {before}{since}"
    return {"gradient_flow"}, [("gradient_flow", "warning", message, gain)]


GATE_STEPS = 100
"""Optimizer steps a module whose gradient was exactly 0 when first read (behind a weight initialised at 0:
a BatchNorm gamma, ReZero's alpha, LoRA's B) is given before ``stalled`` judges it, as ``unstable`` gives
a module grown from zeros ``1 / 0.1**2``: its first updates are as small as the gate is."""


def stalled_rule(layer: str, r: Mapping[str, float], ctx: Context) -> tuple[set[str], list[Hit]]:
    peak, others = r.get("update_ratio_max"), r.get("update_ratio_others")
    if peak is None or others is None or not r.get("update_ratio_full"):
        return set(), []
    gate = r.get("update_steps_from_gate")
    if gate is not None and gate < GATE_STEPS:
        return set(), []  # its gradient was exactly 0 at first (a gate initialised at 0): give it time to open
    t = ctx.thresholds
    if peak < t.stalled_update_ratio and peak < t.stalled_ratio * others:
        scope = f"the last {ctx.window} sampled steps" if ctx.window else "the window"
        message = (
            f"update/weight ratio at most {peak:.1e} over {scope}, while the other modules' is {others:.1e}: "
            "its weights are not moving"
        )
        return {"stalled"}, [("stalled", "warning", message, peak)]
    return {"stalled"}, []


def unstable_rule(layer: str, r: Mapping[str, float], ctx: Context) -> tuple[set[str], list[Hit]]:
    low = r.get("update_ratio_min")
    if low is None or not r.get("update_ratio_full"):
        return set(), []
    limit = ctx.thresholds.unstable_update_ratio
    grown = r.get("update_steps_from_zero")
    if grown is not None and grown < 1 / limit**2:
        return set(), []  # grown from zeros: its ratio is ~1/sqrt(steps) whatever the step size (see UpdateWindow)
    if low > limit:
        scope = f"the last {ctx.window} sampled steps" if ctx.window else "the window"
        message = f"update/weight ratio at least {low:.2g} at every one of {scope} (above {limit:g})"
        return {"unstable"}, [("unstable", "warning", message, low)]
    return {"unstable"}, []
