"""Readings in, plain-English findings out.

Rules (defaults in :class:`Thresholds`, all overridable):

- ``dead``: more than 20% of a rectifier layer's units never fired across the window (warning),
  more than 50% (critical). Judged on ``dead_fraction`` during training and on
  ``val_dead_fraction`` after a validation pass. Only for activations with a flat zero side
  (ReLU, GELU, SiLU, ...): a leaky or bounded activation's "never positive" unit still learns.
- ``saturated``: more than 30% of outputs within 1% of a flat shoulder's bound (tanh, sigmoid, ...).
- ``vanishing_gradient``: gradient std below ``1e-4`` **and** below ``1/100`` of the gradient std
  reaching the output-side monitored layer. The relative part is what keeps a converged network
  healthy: when the loss is near zero every gradient is small, but they are small together.
- ``exploding_gradient``: gradient std above 10 (critical).
- ``collapsed``: activation std below ``1e-3``: the layer says the same thing for every input.
- ``nonfinite``: any NaN or Inf in a layer's activations or gradients (critical).

:class:`FindingLog` keeps, for every (layer, kind), the step it first appeared (its onset) and its
latest state, so a layer that died at step 4 and went NaN at step 5 reports both, in that order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

Severity = Literal["warning", "critical"]
KINDS = ("nonfinite", "dead", "exploding_gradient", "vanishing_gradient", "saturated", "collapsed")

HINTS = {
    "dead": "Try LeakyReLU or GELU, He (Kaiming) initialisation, or a lower learning rate; "
    "dead units can be re-initialised (see lightning_health.rescue).",
    "saturated": "Use Xavier initialisation for tanh/sigmoid, normalise the inputs, or add BatchNorm/LayerNorm "
    "before the activation.",
    "vanishing_gradient": "Add residual connections or normalization, match the initialisation to the activation "
    "(He for ReLU, Xavier for tanh), or switch to a ReLU-family activation.",
    "exploding_gradient": "Lower the learning rate, clip gradients (Trainer(gradient_clip_val=1.0)), add "
    "normalization, or scale down residual branches.",
    "collapsed": "Check the initialisation scale (He/Xavier) and add normalization; collapse usually follows dead "
    "or saturated layers upstream.",
    "nonfinite": "Lower the learning rate, clip gradients, guard log/div against zero, and prefer bf16 to fp16 "
    "when values overflow.",
}


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
    vanishing_grad_std: float = 1e-4
    vanishing_ratio: float = 1e-2
    exploding_grad_std: float = 10.0
    collapse_std: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("dead_warning", "dead_critical", "saturation", "vanishing_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"Expected `{name}` to be a fraction in [0, 1], got {value!r}")
        for name in ("vanishing_grad_std", "exploding_grad_std", "collapse_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Expected `{name}` to be a positive number, got {value!r}")
        if self.dead_critical < self.dead_warning:
            raise ValueError(
                f"Expected `dead_critical` ({self.dead_critical}) to be >= `dead_warning` ({self.dead_warning})"
            )


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem in one layer.

    Attributes:
        layer: the module's qualified name.
        kind: one of ``dead``, ``saturated``, ``vanishing_gradient``, ``exploding_gradient``,
            ``collapsed``, ``nonfinite``.
        severity: ``"warning"`` or ``"critical"``.
        message: what is wrong, in plain English, with the numbers.
        step: the global step at which this problem first appeared (its onset).
        hint: what to try.
        value: the reading that tripped the rule, at the latest evaluation.
        last_step: the latest step at which the problem was seen.
        active: False once the latest readings no longer show the problem.
    """

    layer: str
    kind: str
    severity: Severity
    message: str
    step: int
    hint: str
    value: float = math.nan
    last_step: int = -1
    active: bool = True

    def __str__(self) -> str:
        state = "" if self.active else f" (cleared by step {self.last_step})"
        return f"[{self.severity}] {self.layer}: {self.message} (since step {self.step}){state}"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def evaluate(
    step: int,
    readings: Mapping[str, Mapping[str, float]],
    thresholds: Thresholds,
    *,
    rectifiers: Iterable[str] | None = None,
    output_layer: str | None = None,
    window: int | None = None,
) -> tuple[list[Finding], set[tuple[str, str]]]:
    """Apply the rules to one step's readings.

    Args:
        step: the global step of the readings.
        readings: ``{layer: {metric: value}}``; a rule is checked only where its metric is present.
            ``dead_units``/``units`` may accompany ``dead_fraction`` for an "n/N" message.
        thresholds: the rule thresholds.
        rectifiers: layers whose activation has a flat zero side (the ``dead`` rule applies only to
            them); ``None`` applies it everywhere.
        output_layer: the output-side layer whose gradient std is the reference for vanishing.
        window: the dead-unit window length in sampled batches, for the message.

    Returns:
        The findings at this step, and the (layer, kind) pairs that were checked.
    """
    rect = None if rectifiers is None else set(rectifiers)
    ref = readings.get(output_layer, {}).get("grad_std") if output_layer is not None else None
    found: list[Finding] = []
    checked: set[tuple[str, str]] = set()

    def add(layer: str, kind: str, severity: Severity, message: str, value: float) -> None:
        found.append(Finding(layer, kind, severity, message, step, HINTS[kind], value, step))

    for layer, raw in readings.items():
        # A NaN reading says nothing about the rules that read it (the nonfinite rule reports it),
        # so it neither raises nor clears them.
        r = {k: v for k, v in raw.items() if not math.isnan(v)}
        bad_act, bad_grad = r.get("nonfinite"), r.get("grad_nonfinite")
        if bad_act is not None or bad_grad is not None:
            checked.add((layer, "nonfinite"))
            where = [f"{v:.0f} in {what}" for what, v in (("activations", bad_act), ("gradients", bad_grad)) if v]
            if where:
                add(
                    layer,
                    "nonfinite",
                    "critical",
                    "NaN/Inf values: " + ", ".join(where),
                    (bad_act or 0) + (bad_grad or 0),
                )
        for key, scope in (
            ("dead_fraction", f"the last {window} sampled batches" if window else "the window"),
            ("val_dead_fraction", "the whole validation pass"),
        ):
            dead = r.get(key)
            if dead is None or (rect is not None and layer not in rect) or r.get("nonfinite", 0) > 0:
                continue  # a layer full of NaN is broken, not silent: neither raise nor clear `dead`
            checked.add((layer, "dead"))
            if dead > thresholds.dead_warning:
                severity: Severity = "critical" if dead > thresholds.dead_critical else "warning"
                count = f" ({r['dead_units']:.0f}/{r['units']:.0f})" if "dead_units" in r and "units" in r else ""
                add(
                    layer,
                    "dead",
                    severity,
                    f"{_pct(dead)} of units dead{count}: never fired on any example across {scope}",
                    dead,
                )
        sat = r.get("saturation")
        if sat is not None:
            checked.add((layer, "saturated"))
            if sat > thresholds.saturation:
                add(layer, "saturated", "warning", f"{_pct(sat)} of outputs pressed against a flat shoulder", sat)
        g = r.get("grad_std")
        if g is not None:
            checked.update({(layer, "exploding_gradient"), (layer, "vanishing_gradient")})
            if g > thresholds.exploding_grad_std:
                add(
                    layer,
                    "exploding_gradient",
                    "critical",
                    f"gradient std {g:.2e} above {thresholds.exploding_grad_std:g}",
                    g,
                )
            elif (
                layer != output_layer
                and ref is not None
                and g < thresholds.vanishing_grad_std
                and g < thresholds.vanishing_ratio * ref
            ):
                add(
                    layer,
                    "vanishing_gradient",
                    "warning",
                    f"gradient std {g:.2e}, {g / ref:.1e}x the output-side layer's ({ref:.2e})",
                    g,
                )
        std = r.get("act_std")
        if std is not None:
            checked.add((layer, "collapsed"))
            if std < thresholds.collapse_std:
                add(
                    layer,
                    "collapsed",
                    "warning",
                    f"activation std {std:.2e}: the layer outputs nearly the same value for every input",
                    std,
                )
    return found, checked


class FindingLog:
    """Every problem of the run: its onset step and its latest state, in the order they happened."""

    def __init__(self, layer_order: Sequence[str] = ()) -> None:
        self._order = {name: i for i, name in enumerate(layer_order)}
        self._entries: dict[tuple[str, str], Finding] = {}

    def record(self, findings: Sequence[Finding], checked: set[tuple[str, str]], step: int) -> list[Finding]:
        """Fold one evaluation in. Returns findings that are new or newly critical at this step."""
        escalated = []
        present = {(f.layer, f.kind) for f in findings}
        for f in findings:
            key = (f.layer, f.kind)
            old = self._entries.get(key)
            onset = f.step if old is None else old.step
            self._entries[key] = dataclasses.replace(f, step=onset, last_step=step, active=True)
            if old is None or (f.severity == "critical" and (old.severity != "critical" or not old.active)):
                escalated.append(self._entries[key])
        for key in checked - present:
            old = self._entries.get(key)
            if old is not None and old.active:
                self._entries[key] = dataclasses.replace(old, active=False)
        return escalated

    def findings(self) -> list[Finding]:
        """All findings sorted by onset, then by the layer's position, then by kind."""
        return sorted(
            self._entries.values(),
            key=lambda f: (f.step, self._order.get(f.layer, len(self._order)), KINDS.index(f.kind)),
        )

    def state_dict(self) -> list[dict[str, object]]:
        return [dataclasses.asdict(f) for f in self._entries.values()]

    def load_state_dict(self, state: Sequence[Mapping[str, object]]) -> None:
        fields = {f.name for f in dataclasses.fields(Finding)}
        for item in state:
            f = Finding(**{k: v for k, v in item.items() if k in fields})  # type: ignore[arg-type]
            self._entries[(f.layer, f.kind)] = f


def diagnose_curves(
    curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    thresholds: Thresholds | None = None,
    *,
    rectifiers: Iterable[str] | None = None,
    layer_order: Sequence[str] | None = None,
) -> list[Finding]:
    """Replay the rules over logged curves ``{metric: {layer: [(step, value), ...]}}``.

    This is how ``lightning-health report`` diagnoses a finished run from its TensorBoard files.
    The output-side layer is the last one in ``layer_order`` (or in the order layers appear).
    """
    thresholds = thresholds or Thresholds()
    by_step: dict[int, dict[str, dict[str, float]]] = {}
    order: list[str] = list(layer_order or [])
    for metric, per_layer in curves.items():
        for layer, points in per_layer.items():
            if layer not in order:
                order.append(layer)
            for step, value in points:
                by_step.setdefault(int(step), {}).setdefault(layer, {})[metric] = float(value)
    log = FindingLog(order)
    output = None
    latest_nonfinite: dict[str, float] = {}
    for step in sorted(by_step):
        snapshot = by_step[step]
        for layer, readings in snapshot.items():
            # A validation-only step carries no training reading: judge it with the layer's latest
            # non-finite count, as the live monitor does, so a NaN layer's dead finding stays open.
            if "nonfinite" in readings:
                latest_nonfinite[layer] = readings["nonfinite"]
            elif latest_nonfinite.get(layer):
                readings["nonfinite"] = latest_nonfinite[layer]
        with_grad = [name for name in order if "grad_std" in snapshot.get(name, {})]
        if with_grad:
            output = with_grad[-1]
        found, checked = evaluate(step, snapshot, thresholds, rectifiers=rectifiers, output_layer=output)
        log.record(found, checked, step)
    return log.findings()
