"""Summaries of read-back runs as plain data: latest readings, when each layer died, the course of disease.

No rendering here (the command line prints these as text or JSON through
:mod:`lightning_health.sinks.console`, :mod:`lightning_health.sinks.panel` draws them): only the choice of
which numbers describe a run.

Example:
    >>> from pathlib import Path
    >>> from lightning_health.offline.event_reader import RunHealth
    >>> run = RunHealth("sick", Path("."), {"dead_fraction": {"net.1": [(0, 0.0), (10, 0.25), (20, 1.0)]}})
    >>> death_onsets(run, dead_threshold=0.2)
    {'net.1': 10}
    >>> latest_readings(run)
    {'net.1': {'dead_fraction': 1.0}}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from lightning_health.offline.event_reader import RunHealth

#: Readings that count NaN/Inf values (in activations and in gradients).
NONFINITE_METRICS = frozenset({"nonfinite", "grad_nonfinite"})


class FindingLike(Protocol):
    """The fields of :class:`lightning_health.Finding` that a summary needs."""

    @property
    def layer(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def step(self) -> int: ...


def latest_readings(run: RunHealth) -> dict[str, dict[str, float]]:
    """``{layer: {metric: latest value}}`` for every layer and metric of the run, in layer order.

    This is the shape :meth:`lightning_health.sinks.console.HealthReport.from_latest` takes.
    """
    latest: dict[str, dict[str, float]] = {layer: {} for layer in run.layers}
    for metric, per_layer in run.curves.items():
        for layer, points in per_layer.items():
            if points:
                latest[layer][metric] = points[-1][1]
    return latest


def death_onsets(run: RunHealth, dead_threshold: float) -> dict[str, int | None]:
    """The first step at which each layer's dead fraction exceeded ``dead_threshold``.

    Args:
        run: The run.
        dead_threshold: A fraction in ``[0, 1]``, normally the warning threshold for dead units.

    Returns:
        ``{layer: step}`` for every layer with a dead-fraction curve; ``None`` where it never crossed.

    Raises:
        ValueError: If ``dead_threshold`` is not in ``[0, 1]``.
    """
    if not 0.0 <= dead_threshold <= 1.0:
        raise ValueError(f"Expected `dead_threshold` to be a fraction in [0, 1], got {dead_threshold}")
    onsets: dict[str, int | None] = {}
    for layer, points in run.curves.get("dead_fraction", {}).items():
        onsets[layer] = next((step for step, value in points if value > dead_threshold), None)
    return onsets


def nonfinite_onsets(run: RunHealth) -> dict[str, int]:
    """``{layer: first step}`` for each layer that counted NaN/Inf values (the ``nonfinite`` curves)."""
    onsets: dict[str, int] = {}
    for metric in NONFINITE_METRICS:
        for layer, points in run.curves.get(metric, {}).items():
            step = next((step for step, value in points if not math.isfinite(value) or value > 0), None)
            if step is not None:
                onsets[layer] = min(step, onsets.get(layer, step))
    return onsets


def first_nonfinite_step(run: RunHealth) -> int | None:
    """The first step at which any reading of any layer was NaN/Inf or counted non-finite values."""
    steps = []
    for metric, per_layer in run.curves.items():
        for points in per_layer.values():
            for step, value in points:
                if not math.isfinite(value) or (metric in NONFINITE_METRICS and value > 0):
                    steps.append(step)
                    break
    return min(steps) if steps else None


_KIND_WORDS = {
    "nonfinite": "values turned NaN/Inf",
    "dead": "units died",
    "exploding_gradient": "gradients exploded",
    "vanishing_gradient": "gradients vanished",
    "saturated": "activations saturated",
    "collapsed": "the signal collapsed",
    "inactive": "units fell silent",
    "gradient_flow": "the gradient grew or shrank sharply across depth",
    "stalled": "learning stalled",
    "unstable": "updates too large for the weights",
    "entropy_collapse": "attention entropy collapsed",
    "logit_growth": "attention logits grew",
    "massive_activation": "massive activations appeared",
}


def course_of_disease(findings: Sequence[FindingLike]) -> list[str]:
    """One line per kind of finding, in order of onset: what went wrong, in which layers, from which step.

    Example:
        >>> from types import SimpleNamespace as F
        >>> course_of_disease([F(layer="net.3", kind="dead", step=4), F(layer="net.1", kind="dead", step=2)])
        ['from step 2: units died in net.1 (step 2), net.3 (step 4)']
    """
    by_kind: dict[str, list[FindingLike]] = {}
    for finding in findings:
        by_kind.setdefault(finding.kind, []).append(finding)
    lines = []
    for kind, group in sorted(by_kind.items(), key=lambda item: min(f.step for f in item[1])):
        group = sorted(group, key=lambda f: f.step)
        onset = group[0].step
        if all(f.step == onset for f in group):
            where = ", ".join(f.layer for f in group)
        else:
            where = ", ".join(f"{f.layer} (step {f.step})" for f in group)
        lines.append(f"from step {onset}: {_KIND_WORDS.get(kind, kind)} in {where}")
    return lines


def status_series(run: RunHealth) -> dict[str, list[tuple[int, float]]]:
    """The run's status line over time: ``{"status": [...], "worst/dead_fraction": [...], ...}``.

    The logged ``health/status`` and ``health/worst/*`` scalars when the run has them; for runs logged
    before they existed, ``worst/*`` is rebuilt from the per-layer curves (and ``status`` is left out:
    the live findings are not in the event files).
    """
    if run.status:
        return dict(run.status)
    from lightning_health.sinks.status import worst_readings

    by_step: dict[int, dict[str, dict[str, float]]] = {}
    for metric, per_layer in run.curves.items():
        for layer, points in per_layer.items():
            for step, value in points:
                by_step.setdefault(step, {}).setdefault(layer, {})[metric] = value
    out: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(by_step):
        for name, value in worst_readings(by_step[step]).items():
            out.setdefault(f"worst/{name}", []).append((step, value))
    return out
