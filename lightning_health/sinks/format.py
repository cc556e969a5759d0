"""What the dashboards show besides curves: the findings as rows/markdown and the run's summary numbers.

Shared by the TensorBoard and W&B sinks so both tell the same story in the same words.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_health.diagnosis import Finding

FINDING_COLUMNS = (
    "since_step", "layer", "kind", "severity", "active", "last_step", "value", "message",
    "peak_severity", "peak_step", "peak_value", "peak_message", "hint",
)  # fmt: skip
"""Latest state first, then the worst moment (peak), then the hint."""


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def finding_rows(findings: Sequence[Finding]) -> list[list[Any]]:
    """One row per finding, in :data:`FINDING_COLUMNS` order (plain Python values, NaN as None)."""
    return [
        [f.step, f.layer, f.kind, f.severity, f.active, f.last_step, _finite(f.value), f.message,
         f.peak_severity or f.severity, f.peak_step, _finite(f.peak_value), f.peak_message or f.message, f.hint]
        for f in findings
    ]  # fmt: skip


#: What each kind of finding is called in the findings table.
PROBLEM_NAMES = {
    "nonfinite": "NaN/Inf values", "dead": "dead units", "exploding_gradient": "exploding gradient",
    "vanishing_gradient": "vanishing gradient", "saturated": "saturation", "collapsed": "collapsed signal",
    "inactive": "inactive units", "gradient_flow": "gradient flow across depth", "stalled": "stalled learning",
    "unstable": "update too large", "entropy_collapse": "attention entropy collapse",
    "logit_growth": "attention logit growth", "massive_activation": "massive activations",
}  # fmt: skip


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table_order(finding: Finding) -> tuple[int, int]:
    """Active critical first, then active warnings, then cleared findings; each by onset."""
    rank = 0 if finding.active and finding.severity == "critical" else (1 if finding.active else 2)
    return rank, finding.step


def _status_cell(finding: Finding) -> str:
    if not finding.active:
        return f"cleared after step {finding.last_step} (was {finding.severity})"
    return f"**{finding.severity}**" if finding.severity == "critical" else finding.severity


def findings_markdown(step: int, findings: Sequence[Finding]) -> str:
    """The diagnosis as a Markdown table plus one hint per kind of problem (TensorBoard's text panel).

    Five columns, so the table stays readable in TensorBoard's text tab: what is wrong most urgently
    comes first (active critical findings, then warnings, then what has cleared).
    """
    if not findings:
        return f"**No problems found** as of step {step}."
    active = [f for f in findings if f.active]
    critical = sum(f.severity == "critical" for f in active)
    lines = [
        f"**{len(active)} active finding(s), {critical} critical** as of step {step} "
        f"({len(findings) - len(active)} cleared).",
        "",
        "| layer | problem | status | since step | what it reads |",
        "|---|---|---|---:|---|",
    ]
    for f in sorted(findings, key=_table_order):
        reads = _cell(f.message)
        if f.peaked_earlier:  # on a line of its own: a shorter widest line leaves the narrow columns room
            reads += f"<br>worst: {f.peak_severity} at step {f.peak_step}: {_cell(f.peak_message)}"
        cells = (_cell(f.layer), PROBLEM_NAMES.get(f.kind, f.kind), _status_cell(f), str(f.step), reads)
        lines.append("| " + " | ".join(cells) + " |")
    hints = {f.kind: f.hint for f in findings if f.hint}
    if hints:
        lines += ["", "**What to try**", ""]
        lines += [f"- *{PROBLEM_NAMES.get(kind, kind)}*: {_cell(hint)}" for kind, hint in hints.items()]
    return "\n".join(lines)


def run_summary(
    dead_curves: Mapping[str, Sequence[tuple[int, float]]],
    findings: Sequence[Finding],
    layers: Sequence[str] = (),
) -> dict[str, Any]:
    """Numbers to filter and group runs by: final dead fraction per layer, the worst layer, the verdict.

    Example:
        >>> s = run_summary({"net.1": [(0, 0.1), (5, 0.6)], "net.3": [(5, 0.2)]}, [])
        >>> s["health/worst_layer"], s["health/worst_dead_fraction"], s["health/status"]
        ('net.1', 0.6, 'healthy')
    """
    order = [n for n in layers if n in dead_curves] + [n for n in dead_curves if n not in layers]
    final = {name: dead_curves[name][-1][1] for name in order if dead_curves[name]}
    out: dict[str, Any] = {f"health/final_dead_fraction/{name}": value for name, value in final.items()}
    finite = {name: v for name, v in final.items() if math.isfinite(v)}
    if finite:
        worst = max(finite, key=lambda name: finite[name])  # first in forward order on ties
        out["health/worst_layer"] = worst
        out["health/worst_dead_fraction"] = finite[worst]
    active = [f for f in findings if f.active]
    out["health/n_findings"] = len(findings)  # not "health/findings": that key holds the findings table
    out["health/n_active_findings"] = len(active)
    out["health/n_critical_findings"] = sum(f.severity == "critical" for f in active)
    out["health/status"] = "critical" if out["health/n_critical_findings"] else ("warning" if active else "healthy")
    out["health/first_finding"] = str(findings[0]) if findings else ""
    return out
