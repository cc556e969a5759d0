"""The doctor's chart: a per-layer table and the findings, as data first, then text.

:class:`HealthReport` holds plain numbers; :meth:`HealthReport.render_text` and
:func:`print_report` turn it into a plain-text or ``rich`` table. No maths happens here.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping, Sequence
from typing import IO

from lightning_health.diagnosis import Finding

COLUMNS = ("layer", "act mean", "act std", "grad std", "max grad", "dead", "sat %")
NONFINITE_MARK = "!! "
"""Prefixes a layer whose latest outputs held NaN/Inf; such rows are listed first."""


@dataclasses.dataclass
class LayerRow:
    """One table row: the latest readings of a layer."""

    layer: str
    act_mean: float | None = None
    act_std: float | None = None
    grad_std: float | None = None
    grad_max: float | None = None
    dead_units: int | None = None
    units: int | None = None
    dead_fraction: float | None = None
    saturation: float | None = None
    broken: bool = False  # the layer's latest outputs held NaN/Inf

    def cells(self) -> list[str]:
        if self.broken:
            dead = "nan"  # NaN units are neither alive nor dead: the nonfinite finding explains them
        elif self.dead_units is not None and self.units:
            dead = f"{self.dead_units}/{self.units}"
        elif self.dead_fraction is not None:
            dead = f"{100 * self.dead_fraction:.0f}%"
        else:
            dead = "-"
        sat = "-" if self.saturation is None else f"{100 * self.saturation:.0f}%"
        return [
            f"{NONFINITE_MARK}{self.layer}" if self.broken else self.layer,
            _num(self.act_mean),
            _num(self.act_std),
            _sci(self.grad_std),
            _sci(self.grad_max),
            dead,
            sat,
        ]


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    x = x + 0.0  # -0.0 (a max over an all-zero gradient) prints as 0
    return f"{x:.3g}" if not math.isfinite(x) or abs(x) < 1e5 else f"{x:.2e}"


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x + 0.0:.2e}"


@dataclasses.dataclass
class HealthReport:
    """What the console shows at the end of fit."""

    title: str
    step: int
    rows: list[LayerRow]
    findings: list[Finding]

    @classmethod
    def from_latest(
        cls,
        title: str,
        step: int,
        latest: Mapping[str, Mapping[str, float]],
        findings: Sequence[Finding],
        units: Mapping[str, tuple[int | None, int]] | None = None,
    ) -> HealthReport:
        """Build from ``{layer: {metric: latest value}}`` and optional ``{layer: (dead, units)}``."""
        rows = []
        for layer, r in latest.items():
            dead, total = (units or {}).get(layer, (None, 0))
            frac = r.get("dead_fraction", r.get("val_dead_fraction"))
            rows.append(
                LayerRow(
                    layer=layer,
                    act_mean=r.get("act_mean"),
                    act_std=r.get("act_std"),
                    grad_std=r.get("grad_std"),
                    grad_max=r.get("grad_max"),
                    dead_units=dead,
                    units=total or None,
                    dead_fraction=frac,
                    saturation=r.get("saturation"),
                    broken=bool(r.get("nonfinite")),
                )
            )
        rows.sort(key=lambda row: not row.broken)  # stable: NaN/Inf layers first, each group in layer order
        return cls(title=title, step=step, rows=rows, findings=list(findings))

    def nonfinite_line(self) -> str | None:
        """One line naming the layers with NaN/Inf outputs, or ``None`` when there are none."""
        broken = [row.layer for row in self.rows if row.broken]
        if not broken:
            return None
        return (
            f"{NONFINITE_MARK}NaN/Inf outputs in {len(broken)} layer(s): {', '.join(broken)}; their dead/alive/"
            "dormant/collapsed readings are NaN (not measurable), not healthy."
        )

    def render_text(self) -> str:
        """A fixed-width table followed by the findings with their hints."""
        table = [list(COLUMNS), *[row.cells() for row in self.rows]]
        widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
        lines = [f"=== {self.title} | step {self.step} | per-layer health ==="]
        if self.nonfinite_line():
            lines.append(str(self.nonfinite_line()))
        for i, row in enumerate(table):
            lines.append(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append("-+-".join("-" * w for w in widths))
        lines.append("")
        lines += findings_lines(self.findings)
        return "\n".join(lines)


def findings_lines(findings: Sequence[Finding]) -> list[str]:
    """The findings as numbered lines with hints, or a one-line all-clear."""
    if not findings:
        return ["No findings: every monitored layer looks healthy."]
    critical = sum(f.severity == "critical" for f in findings)
    out = [f"{len(findings)} finding(s), {critical} critical, in order of onset:"]
    for f in findings:
        out.append(f"- {f}")  # latest state, and the worst moment when it was worse
        out.append(f"    hint: {f.hint}")
    return out


def print_report(report: HealthReport, file: IO[str] | None = None) -> None:
    """Print with ``rich`` when it is installed (and writing to a terminal-like stream), else plain text."""
    stream = file or sys.stdout
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(report.render_text(), file=stream, flush=True)
        return
    console = Console(file=stream, width=max(100, Console(file=stream).width))
    if report.nonfinite_line():
        console.print(report.nonfinite_line(), style="bold red", markup=False, highlight=False)
    table = Table(title=f"{report.title} | step {report.step} | per-layer health", title_justify="left")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "layer" else "right")
    for row in report.rows:
        table.add_row(*row.cells())
    console.print(table)
    for line in findings_lines(report.findings):
        style = "bold red" if "[critical]" in line else ("yellow" if "[warning]" in line else None)
        console.print(line, style=style, markup=False, highlight=False)
