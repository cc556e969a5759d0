"""Readings in, plain-English findings out.

Rules (defaults in :class:`Thresholds`, all overridable):

- ``dead``: more than 20% of a layer's units never fired across the window (warning), more than
  50% (critical). Judged on ``dead_fraction`` during training and on ``val_dead_fraction`` after
  a validation pass; a training window with fewer than :data:`MIN_DEAD_EVIDENCE` outputs per unit
  calls only the critical share. Only for activations with a hard-zero side, probed (ReLU, ReLU6, Hardswish,
  Hardsigmoid): there a unit gets exactly no gradient. A leaky, smooth or bounded activation's
  "never positive" unit still learns.
- ``inactive``: more than 50% of a smooth rectifier's units (GELU, SiLU, Mish, ELU, Softplus...)
  never output > 0 across the window or a validation pass (warning only): they sit on the
  negative side, which still passes a gradient.
- ``saturated``: more than 50% of outputs on a shoulder where the activation's slope is below
  20% of its peak (tanh ``|y| >= 0.894``, sigmoid ``y <= 0.053`` or ``>= 0.947``, ReLU6 ``y = 6``):
  most of the layer passes back less than a fifth of its gradient. Well-trained tanh and sigmoid
  layers (an MLP at loss 0.001, a tanh RNN) push 30-39% of their outputs onto a shoulder as they
  grow confident; layers saturated by a large init or learning rate read 52-100%.
- ``vanishing_gradient``: gradient norm below ``1/100`` of the gradient norm reaching the
  output-side monitored layer. Relative, so a converged network (every gradient small together)
  stays healthy and the loss scale cancels; on norms rather than per-element stds, so a wide layer
  feeding a narrow one is not called vanishing (a fan-in-scaled Linear preserves the norm, not the
  per-element std). A layer whose gradient was exactly 0 at its first reading sits behind a weight
  initialised at 0 (a gate: BatchNorm gamma, ReZero's alpha, LoRA's B) and is judged only once its
  gradient has cleared the line. ``vanishing_grad_std`` adds an absolute gate when set (off by default).
- ``exploding_gradient``: gradient std above ``100x`` the layer's usual level (the median of its
  earlier readings) at two sampled steps in a row, or ``100**2`` x at one (critical); scale-free (see
  :mod:`lightning_health.diagnosis.baseline`). A layer behind a gate initialised at 0 is not judged
  while it opens. ``exploding_grad_std``
  adds the old absolute threshold when set (off by default).
- ``collapsed``: more than 50% of a layer's live units constant across the batch (their std is below
  ``1e-3`` of the layer's RMS); units that are exactly 0 everywhere are left to ``dead``/dormancy and
  out of the share.
  Where no ``collapsed_fraction`` was read (older event files), the pooled ``act_std`` below
  ``1e-3`` is the fallback.
- ``nonfinite``: any NaN or Inf in a layer's activations or gradients (critical).
- ``gradient_flow``: across the stretch of the network between two consecutive monitored layers,
  the activation gradient's norm changes by more than ``flow_gain`` (10x) either way **and** that
  explains something: the layer the gradient reaches next has a vanishing or exploding finding
  (the stretch is where it starts), or the stretch's gain moved more than ``flow_gain`` x away from
  its own usual gain. A stretch that has always shrunk the gradient this much (a head's
  transform, a residual branch beside its skip path) is the architecture, not a finding. Read from
  :func:`~lightning_health.diagnosis.learning.depth_profile`.
- ``stalled``: a module's update-to-weight ratio stayed below ``1e-5`` **and** below ``1/100`` of
  the other modules' over the whole window, while it did get a gradient (frozen modules and steps
  the GradScaler skipped are not judged; a module whose gradient was exactly 0 when first read, behind
  a weight initialised at 0, only from 100 steps on).
- ``unstable``: a module's update-to-weight ratio stayed above ``0.1`` over the whole window: every
  step moves its weights by a tenth of their size. A module that was all zeros when first read (a
  zero-initialised bias or projection) is judged only ``1/0.1**2 = 100`` steps later: until then its
  weights are its own few updates and the ratio says nothing about the step size.
- ``entropy_collapse``: an attention layer's mean entropy (over heads and queries) below ``0.1``
  nats (warning; Zhai et al., 2023). One sharp head is what training builds, not a finding.
- ``logit_growth``: ``attn_logit_max`` above ``100`` (warning; Dehghani et al., 2023; Wortsman et
  al., 2023; the bound is Kimi K2's QK-Clip cap). Growth from the first readings is not judged:
  learning to attend takes the logits from ~0 at initialisation to 10-30.
- ``massive_activation``: a residual block's ``massive_ratio`` at least ``100`` (Sun et al., 2024)
  and ``4x`` its lowest of the last 10 readings: a jump, not existence nor a slow build-up (warning).

Each rule is one small function registered in :data:`RULES`: adding a rule is adding a function. The
rules on one layer's readings live here, the learning rules in
:mod:`~lightning_health.diagnosis.learning_rules`, the transformer rules in
:mod:`~lightning_health.diagnosis.attention_rules`; all read a :class:`~lightning_health.diagnosis.context.Context`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

from lightning_health.diagnosis.attention_rules import entropy_rule, logit_rule, massive_rule
from lightning_health.diagnosis.baseline import GradBaseline
from lightning_health.diagnosis.context import Context, Hit, Rule, pct
from lightning_health.diagnosis.findings import Finding, Severity
from lightning_health.diagnosis.hints import HINTS
from lightning_health.diagnosis.learning import previous_layers
from lightning_health.diagnosis.learning_rules import gradient_flow_rule, stalled_rule, unstable_rule
from lightning_health.diagnosis.thresholds import Thresholds


def nonfinite_rule(layer: str, r: Mapping[str, float], ctx: Context) -> tuple[set[str], list[Hit]]:
    bad_act, bad_grad = r.get("nonfinite"), r.get("grad_nonfinite")
    if bad_act is None and bad_grad is None:
        return set(), []
    where = [f"{v:.0f} in {what}" for what, v in (("activations", bad_act), ("gradients", bad_grad)) if v]
    if not where:
        return {"nonfinite"}, []
    value = (bad_act or 0) + (bad_grad or 0)
    return {"nonfinite"}, [("nonfinite", "critical", "NaN/Inf values: " + ", ".join(where), value)]


MIN_DEAD_EVIDENCE = 32
"""Outputs per unit the dead window must hold before a share of silent units below ``dead_critical`` is a
finding. A ReLU MLP trained healthy at batch size 2 has 23-31% of its units silent on the 8 examples of
a 4-batch window (rare features: a unit that fires on 3% of inputs misses 8 in a row 78% of the time);
at batch 8 (32 outputs) it reads at most 16%. A layer killed outright (most of it silent) is still
called, critical, on any evidence."""


def dead_rule(layer: str, r: Mapping[str, float], ctx: Context) -> tuple[set[str], list[Hit]]:
    checked: set[str] = set()
    hits: list[Hit] = []
    t = ctx.thresholds
    for key, scope in (
        ("dead_fraction", f"the last {ctx.window} sampled batches" if ctx.window else "the window"),
        ("val_dead_fraction", "the whole validation pass"),
    ):
        dead = r.get(key)
        if dead is None or (ctx.rectifiers is not None and layer not in ctx.rectifiers) or r.get("nonfinite", 0) > 0:
            continue  # a layer full of NaN is broken, not silent: neither raise nor clear `dead`
        checked.add("dead")
        per_unit = r.get("values_per_unit") if key == "dead_fraction" else None
        thin = per_unit is not None and ctx.window is not None and per_unit * ctx.window < MIN_DEAD_EVIDENCE
        if thin and dead <= t.dead_critical:
            continue  # too few outputs per unit in the window to tell a dead unit from a rare one
        if dead > t.dead_warning:
            severity: Severity = "critical" if dead > t.dead_critical else "warning"
            count = f" ({r['dead_units']:.0f}/{r['units']:.0f})" if "dead_units" in r and "units" in r else ""
            hits.append(
                (
                    "dead",
                    severity,
                    f"{pct(dead)} of units dead{count}: never fired on any example across {scope}",
                    dead,
                )
            )
    return checked, hits


def inactive_rule(layer: str, r: Mapping[str, float], ctx: Context) -> tuple[set[str], list[Hit]]:
    """Units of a smooth rectifier (GELU, SiLU, ELU, ...) that never output > 0: inactive, not dead.

    Their activation keeps a gradient on its negative side, so they still learn and can come
    back: a warning at most, from ``inactive_warning`` of the units.
    """
    if layer not in ctx.smooth_rectifiers or r.get("nonfinite", 0) > 0:
        return set(), []
    checked: set[str] = set()
    hits: list[Hit] = []
    for key, scope in (("dead_fraction", "the window"), ("val_dead_fraction", "the whole validation pass")):
        share = r.get(key)
        if share is None:
            continue
        checked.add("inactive")
        if share > ctx.thresholds.inactive_warning:
            message = (
                f"{pct(share)} of units never output > 0 across {scope}: they sit on the activation's "
                "smooth negative side, which still passes a small gradient (inactive, not dead)"
            )
            hits.append(("inactive", "warning", message, share))
    return checked, hits


def saturation_rule(layer: str, r: Mapping[str, float], ctx: Context) -> tuple[set[str], list[Hit]]:
    sat = r.get("saturation")
    if sat is None or layer in ctx.heads:  # an output head at its limit is predicting 0 or 1: its job
        return set(), []
    if sat > ctx.thresholds.saturation:
        return {"saturated"}, [("saturated", "warning", f"{pct(sat)} of outputs pressed against a flat shoulder", sat)]
    return {"saturated"}, []


def gradient_rule(layer: str, r: Mapping[str, float], ctx: Context) -> tuple[set[str], list[Hit]]:
    g = r.get("grad_std")
    if g is None:
        return set(), []
    t = ctx.thresholds
    checked = {"exploding_gradient", "vanishing_gradient"}
    base = ctx.baseline.reference(layer, ctx.output_layer, t.baseline_floor) if ctx.baseline is not None else None
    gated = ctx.baseline is not None and ctx.baseline.gated(layer)  # opening from exactly 0 is not exploding
    if base is not None and not gated and g > t.exploding_growth * base:
        before = ctx.baseline.previous(layer) if ctx.baseline is not None else None
        sustained = before is not None and before > t.exploding_growth * base  # one batch's spike is no explosion
        if sustained or g > t.exploding_growth**2 * base:
            when = " for two sampled steps" if sustained else ""
            message = f"gradient std {g:.2e}, {g / base:.3g}x its usual level ({base:.2e}){when}"
            return checked, [("exploding_gradient", "critical", message, g / base)]
    if t.exploding_grad_std is not None and g > t.exploding_grad_std:
        return checked, [("exploding_gradient", "critical", f"gradient std {g:.2e} above {t.exploding_grad_std:g}", g)]
    if layer == ctx.output_layer or layer in ctx.heads:  # the reference, or output-side of it: nothing to lose
        return checked, []
    if t.vanishing_grad_std is not None and g >= t.vanishing_grad_std:
        return checked, []
    # Norms where both layers have one (width-free), else per-element stds (older event files).
    norm, ref_norm = r.get("grad_norm"), ctx.reference_grad_norm
    mine, ref, what = (norm, ref_norm, "norm") if norm is not None and ref_norm else (g, ctx.reference_grad_std, "std")
    if ref and mine < t.vanishing_ratio * ref:
        if gated:
            return checked, []  # behind a gate initialised at exactly 0 that has not opened yet: by design
        message = f"gradient {what} {mine:.2e}, {mine / ref:.1e}x the output-side layer's ({ref:.2e})"
        return checked, [("vanishing_gradient", "warning", message, mine / ref)]
    if ref and ctx.baseline is not None:
        ctx.baseline.open(layer)
    return checked, []


def collapse_rule(layer: str, r: Mapping[str, float], ctx: Context) -> tuple[set[str], list[Hit]]:
    t = ctx.thresholds
    share = r.get("collapsed_fraction")
    if share is not None:
        if share > t.collapsed:
            message = (
                f"{pct(share)} of live units constant across the batch (std below {t.collapse_unit_ratio:g} "
                "of the layer's RMS): they pass on no information about the input"
            )
            return {"collapsed"}, [("collapsed", "warning", message, share)]
        return {"collapsed"}, []
    std = r.get("act_std")
    if std is None or t.collapse_std is None:
        return set(), []
    if std < t.collapse_std:
        message = f"activation std {std:.2e}: the layer outputs nearly the same value for every input"
        return {"collapsed"}, [("collapsed", "warning", message, 1.0)]  # no per-unit share: call it all
    return {"collapsed"}, []


RULES: tuple[Rule, ...] = (
    nonfinite_rule, dead_rule, inactive_rule, saturation_rule, gradient_rule, collapse_rule,
    gradient_flow_rule, stalled_rule, unstable_rule, entropy_rule, logit_rule, massive_rule,
)  # fmt: skip
"""Every rule, in the order their findings are listed at one step."""


_FAILED: set[str] = set()  # rules already reported as failing (one warning per rule and process)


def _rule_failed(rule: Rule, layer: str, err: Exception) -> None:
    """One warning per faulty rule; the other rules, and the run, go on."""
    name = getattr(rule, "__name__", repr(rule))
    if name in _FAILED:
        return
    _FAILED.add(name)
    warnings.warn(
        f"lightning_health: the diagnosis rule `{name}` failed on `{layer}` ({type(err).__name__}: {err}) and is "
        "skipped where it fails; the other rules and training go on. Please report this.",
        RuntimeWarning,
        stacklevel=3,
    )


def _finite(raw: Mapping[str, float]) -> dict[str, float]:
    """A NaN reading says nothing about the rules that read it (the nonfinite rule reports it)."""
    return {k: v for k, v in raw.items() if not math.isnan(v)}


def _gradient_layers(readings: Mapping[str, Mapping[str, float]], ctx: Context) -> frozenset[str]:
    """The layers whose gradient is vanishing or exploding at this step (``gradient_flow`` locates them)."""
    hit = set()
    for layer, raw in readings.items():
        try:
            _kinds, hits = gradient_rule(layer, _finite(raw), ctx)
        except Exception:  # reported once by the main pass
            continue
        if hits:
            hit.add(layer)
    return frozenset(hit)


def evaluate(
    step: int,
    readings: Mapping[str, Mapping[str, float]],
    thresholds: Thresholds,
    *,
    rectifiers: Iterable[str] | None = None,
    output_layer: str | None = None,
    window: int | None = None,
    smooth_rectifiers: Iterable[str] = (),
    layer_order: Sequence[str] | None = None,
    baseline: GradBaseline | None = None,
    gain_baseline: GradBaseline | None = None,
    heads: Iterable[str] = (),
) -> tuple[list[Finding], set[tuple[str, str]]]:
    """Apply every rule in :data:`RULES` to one step's readings.

    Args:
        step: the global step of the readings.
        readings: ``{layer: {metric: value}}``; a rule is checked only where its metric is present.
            ``dead_units``/``units`` may accompany ``dead_fraction`` for an "n/N" message.
        thresholds: the rule thresholds.
        rectifiers: layers whose activation has a hard-zero side, where a unit gets no gradient
            (the ``dead`` rule applies only to them); ``None`` applies it everywhere.
        output_layer: the output-side layer whose gradient std is the reference for vanishing.
        window: the dead-unit window length in sampled batches, for the message.
        smooth_rectifiers: layers whose activation has a smooth off side (GELU, SiLU, ELU, ...):
            the ``inactive`` rule reads their never-positive units.
        layer_order: the monitored layers in forward order, to name both ends of a gradient-flow stretch.
        baseline: the per-layer usual gradient level, updated here with these readings (the
            scale-free explosion rule is off without it; the live monitor and the replay keep one).
        gain_baseline: the same on ``grad_gain`` (metric ``"grad_gain"``): with it, ``gradient_flow``
            fires only where a stretch changed or locates a vanishing/exploding layer; without it, on
            every stretch outside the band.
        heads: the model's output layers (their output reaches the loss through no learned weight):
            sitting at an activation's limit is their prediction, not saturation, and the stretch into
            them carries the loss's own derivative, so neither ``saturated`` nor ``gradient_flow`` reads them.

    Returns:
        The findings at this step, and the (layer, kind) pairs that were checked.
    """
    out = readings.get(output_layer, {}) if output_layer is not None else {}
    for tracker in (baseline, gain_baseline):
        if tracker is not None:
            tracker.observe(readings)
    hard = None if rectifiers is None else set(rectifiers)
    ctx = Context(
        step=step, thresholds=thresholds, rectifiers=hard, smooth_rectifiers=set(smooth_rectifiers),
        output_layer=output_layer, reference_grad_std=out.get("grad_std"), window=window, baseline=baseline,
        reference_grad_norm=out.get("grad_norm"), previous=previous_layers(layer_order or ()),
        gain_baseline=gain_baseline, heads=frozenset(heads),
    )  # fmt: skip
    if gain_baseline is not None:  # gradient_flow locates where a vanishing/exploding gradient starts
        ctx = dataclasses.replace(ctx, gradient_layers=_gradient_layers(readings, ctx))
    found: list[Finding] = []
    checked: set[tuple[str, str]] = set()
    for layer, raw in readings.items():
        r = _finite(raw)  # so a NaN reading neither raises nor clears a rule
        for rule in RULES:
            try:
                kinds, hits = rule(layer, r, ctx)
            except Exception as err:  # a rule's own fault must never stop the user's training run
                _rule_failed(rule, layer, err)
                continue
            checked.update((layer, kind) for kind in kinds)
            found.extend(
                Finding(layer, kind, sev, msg, step, HINTS[kind], value, step) for kind, sev, msg, value in hits
            )
    return found, checked
