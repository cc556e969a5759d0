"""The status line of a run: a few scalars that summarise the whole network at one sampled step.

Pure data in, scalars out: the per-layer readings of one step (``{layer: {metric: value}}``, the
snapshot the diagnosis reads), the live findings and the step's histograms. Every sink writes what
comes out like any other scalar, and the dashboards put it first:

- ``health/status``: 0 ok, 1 warning (an active finding), 2 critical (an active critical finding,
  or any layer with NaN/Inf values);
- ``health/worst/<reading>``: the worst layer's value of a key reading (see :data:`WORST_READINGS`).
  NaN never hides a sick run: a layer with NaN/Inf values counts as the worst layer of every
  reading (1.0 for the fractions, 0.0 for the gradient ratio);
- ``health/act_out_of_range/<layer>`` and ``health/grad_out_of_range/<layer>``: the share of the
  histogram sample that fell beyond the histogram's edges (counted on the device in the histogram
  pass, in its two open-end buckets), so an explosion the histogram cannot draw still shows.

Example:
    >>> snapshot = {"net.1": {"dead_fraction": 0.25, "grad_std": 1e-3}, "net.3": {"nonfinite": 4.0}}
    >>> s = status_scalars(snapshot, [])
    >>> s["health/status"], s["health/worst/nonfinite_layers"], s["health/worst/dead_fraction"]
    (2.0, 1.0, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_health.sinks.base import Histogram

STATUS_TAG = "health/status"
WORST_PREFIX = "health/worst/"
OK, WARNING, CRITICAL = 0.0, 1.0, 2.0
STATUS_WORDS = {0: "ok", 1: "warning", 2: "critical"}

#: ``(name, meaning)`` of the ``health/worst/<name>`` scalars, in the order the panel shows them.
WORST_READINGS: tuple[tuple[str, str], ...] = (
    ("nonfinite_layers", "layers with NaN/Inf activations or gradients (0 is healthy)"),
    ("dead_fraction", "largest dead fraction over layers (a NaN layer counts as 1.0)"),
    ("saturation", "largest saturated fraction over layers (a NaN layer counts as 1.0)"),
    ("grad_std_ratio", "smallest / largest gradient std over layers: 1 even, near 0 vanishing or exploding"),
)
_FRACTIONS = ("dead_fraction", "saturation")
_NONFINITE_COUNTS = ("nonfinite", "grad_nonfinite")


def layer_is_nonfinite(readings: Mapping[str, float]) -> bool:
    """Whether a layer's readings count NaN/Inf values or are themselves not finite."""
    if any(readings.get(key, 0.0) != 0.0 for key in _NONFINITE_COUNTS):  # a NaN count is != 0 too
        return True
    return any(isinstance(v, float) and not math.isfinite(v) for v in readings.values())


def status_code(findings: Sequence[Any], nonfinite_layers: int = 0) -> float:
    """0 ok, 1 warning, 2 critical, from the active findings (and any layer gone NaN/Inf)."""
    active = [f for f in findings if getattr(f, "active", True)]
    if nonfinite_layers or any(f.severity == "critical" for f in active):
        return CRITICAL
    return WARNING if active else OK


def worst_readings(snapshot: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``{"nonfinite_layers": n, "dead_fraction": max, ...}`` over the layers of one step (see :data:`WORST_READINGS`).

    A reading no layer has is left out (a run that logs no gradients has no ``grad_std_ratio``).
    """
    broken = {layer for layer, readings in snapshot.items() if layer_is_nonfinite(readings)}
    out: dict[str, float] = {"nonfinite_layers": float(len(broken))}
    for name in _FRACTIONS:
        values = [1.0 if layer in broken else r[name] for layer, r in snapshot.items() if name in r]
        values += [1.0] * len(broken)  # a layer gone NaN counts as the worst even without the reading
        if values:
            out[name] = max(1.0 if math.isnan(v) else v for v in values)
    stds = [(layer, r["grad_std"]) for layer, r in snapshot.items() if "grad_std" in r]
    if stds:
        if any(layer in broken or not math.isfinite(v) for layer, v in stds):
            out["grad_std_ratio"] = 0.0
        else:
            largest = max(v for _, v in stds)
            out["grad_std_ratio"] = min(v for _, v in stds) / largest if largest > 0 else 0.0
    return out


def out_of_range_share(hist: Histogram) -> float:
    """The share of a histogram's values below its first edge or above its last (NaN/Inf counted in the total)."""
    total = float(sum(hist.counts))
    return (float(hist.below) + float(hist.above)) / total if total > 0 else 0.0


def out_of_range_scalars(histograms: Mapping[str, Histogram]) -> dict[str, float]:
    """``health/act_out_of_range/<layer>`` and ``health/grad_out_of_range/<layer>`` from the step's histograms."""
    out = {}
    for tag, hist in histograms.items():
        for kind, metric in (("health/activations/", "act_out_of_range"), ("health/gradients/", "grad_out_of_range")):
            if tag.startswith(kind):
                out[f"health/{metric}/{tag[len(kind) :]}"] = out_of_range_share(hist)
    return out


def status_scalars(
    snapshot: Mapping[str, Mapping[str, float]],
    findings: Sequence[Any],
    histograms: Mapping[str, Histogram] | None = None,
) -> dict[str, float]:
    """Every status scalar of one sampled step: ``health/status``, ``health/worst/*`` and the out-of-range shares.

    Args:
        snapshot: ``{layer: {metric: value}}`` of the step.
        findings: the run's findings so far (objects with ``severity`` and ``active``).
        histograms: the step's histograms by tag (``health/activations/<layer>``, ``health/gradients/<layer>``).
    """
    worst = worst_readings(snapshot)
    out = {STATUS_TAG: status_code(findings, int(worst["nonfinite_layers"]))}
    out.update({WORST_PREFIX + name: value for name, value in worst.items()})
    out.update(out_of_range_scalars(histograms or {}))
    return out


def status_summary(
    dead_curves: Mapping[str, Sequence[tuple[int, float]]],
    nonfinite_curves: Mapping[str, Sequence[tuple[int, float]]],
    findings: Sequence[Any],
    layers: Sequence[str] = (),
) -> dict[str, Any]:
    """The run summary (see :func:`lightning_health.sinks.format.run_summary`) ordered so that NaN runs sort worst.

    On top of the per-layer finals: ``health/status`` is the number (0 ok, 1 warning, 2 critical),
    ``health/verdict`` the word; ``health/nonfinite_layers`` counts the layers that went NaN/Inf during
    the run and ``health/first_nonfinite_step`` says when. A layer that went NaN/Inf is the worst layer
    and its dead fraction counts as 1.0, so sorting runs by ``health/worst_dead_fraction`` (or by
    ``health/status``) never ranks a NaN run healthiest.

    Example:
        >>> s = status_summary({"a": [(5, 0.2)], "b": [(5, 0.0)]}, {"b": [(3, 0.0), (4, 7.0)]}, [])
        >>> s["health/status"], s["health/worst_layer"], s["health/worst_dead_fraction"]
        (2, 'b', 1.0)
        >>> s["health/nonfinite_layers"], s["health/first_nonfinite_step"]
        (1, 4)
    """
    from lightning_health.sinks.format import run_summary

    out = run_summary(dead_curves, findings, layers)
    broken = {
        name: min(step for step, v in points if v != 0)
        for name, points in nonfinite_curves.items()
        if any(v != 0 for _, v in points)
    }
    broken.update({n: min(s for s, v in pts if not math.isfinite(v)) for n, pts in dead_curves.items()
                   if n not in broken and any(not math.isfinite(v) for _, v in pts)})  # fmt: skip
    if broken:
        order = [n for n in layers if n in broken] + sorted(n for n in broken if n not in layers)
        out["health/worst_layer"] = order[0]
        out["health/worst_dead_fraction"] = 1.0
        out["health/first_nonfinite_step"] = min(broken.values())
    code = int(status_code(findings, len(broken)))
    out["health/verdict"] = {0: "healthy", 1: "warning", 2: "critical"}[code]
    out["health/status"] = code
    out["health/nonfinite_layers"] = len(broken)
    return out
