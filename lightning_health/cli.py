"""The ``lightning-health`` command.

``lightning-health report PATH... [--png FILE] [--json]`` reads health readings back from TensorBoard
event files and prints, per run, the per-layer table and the findings, and with several runs a
comparison of which layers died and when.

Exit codes: 0 on success, 2 when a path does not exist or holds no health readings (after reporting
every path that does), and argparse's 2 for bad arguments.

Example:
    >>> main(["report", "/nonexistent/runs"])  # doctest: +SKIP
    lightning-health: /nonexistent/runs does not exist
    2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from lightning_health.run_summary import (
    PERCENT_METRICS,
    TABLE_COLUMNS,
    LayerRow,
    death_onsets,
    first_nonfinite_step,
    layer_rows,
)
from lightning_health.tensorboard_reader import RunHealth, make_names_unique, read_path

PROG = "lightning-health"
EXIT_OK = 0
EXIT_NO_DATA = 2
DEFAULT_DEAD_WARNING = 0.2
# Gradients span many decades; print them alike so a column reads at a glance.
_SCIENTIFIC_METRICS = frozenset({"grad_std", "grad_max", "grad_norm", "param_grad_norm"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: The arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit code (also what the console script exits with).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_NO_DATA
    return int(args.handler(args))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its sub-commands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Per-layer activation and gradient health of PyTorch Lightning runs.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    report = commands.add_parser(
        "report",
        help="print the health report of runs logged to TensorBoard",
        description=(
            "Read the health readings (scalars health/<metric>/<layer>) back from TensorBoard event files "
            "and print each run's per-layer table and findings; with several runs, compare when their layers died."
        ),
    )
    report.add_argument("paths", nargs="+", metavar="PATH", help="a run directory, or a directory holding many runs")
    report.add_argument(
        "--png",
        metavar="FILE",
        help="also draw the diagnosis panel to FILE (one file per run: FILE's stem + the run's name)",
    )
    report.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    report.set_defaults(handler=_report_command)
    return parser


# ----------------------------------------------------------------------------------------------- report


def _report_command(args: argparse.Namespace) -> int:
    runs, problems = _collect_runs(args.paths)
    for problem in problems:
        print(f"{PROG}: {problem}", file=sys.stderr)
    if not runs:
        return EXIT_NO_DATA

    pngs = _write_pngs(runs, args.png) if args.png else {}
    if args.json:
        json.dump(_report_json(runs, pngs), sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        _print_report(runs, pngs, sys.stdout)
    return EXIT_NO_DATA if problems else EXIT_OK


def _collect_runs(paths: Sequence[str]) -> tuple[list[RunHealth], list[str]]:
    """Every run with health readings under the paths, and a one-line problem per path without any."""
    runs: list[RunHealth] = []
    problems: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            problems.append(f"{raw} does not exist")
            continue
        found = read_path(path)
        if not found:
            problems.append(f"no TensorBoard event files under {raw}")
            continue
        with_data = [run for run in found if run.has_health_data()]
        if not with_data:
            problems.append(
                f"no health readings (health/<metric>/<layer> scalars) in the event files under {raw}; "
                "was HealthMonitor among the Trainer's callbacks?"
            )
            continue
        runs.extend(with_data)
    make_names_unique(runs)
    return runs, problems


def _png_path(base: str, run: RunHealth, several: bool) -> Path:
    target = Path(base)
    if not several:
        return target
    safe = "".join(char if char.isalnum() or char in "-_." else "_" for char in run.name).strip("_") or "run"
    suffix = target.suffix or ".png"
    return target.with_name(f"{target.stem}-{safe}{suffix}")


def _write_pngs(runs: list[RunHealth], base: str) -> dict[str, str | None]:
    from lightning_health.panel import save_run_panel

    written: dict[str, str | None] = {}
    for run in runs:
        path = _png_path(base, run, several=len(runs) > 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        written[run.name] = str(path) if save_run_panel(run, path) else None
    return written


# --------------------------------------------------------------------------------------------- rendering


def _fmt(value: float | None, metric: str = "") -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if metric in PERCENT_METRICS:
        return f"{100.0 * value:.0f}%"
    if value == 0.0:
        return "0"
    if metric in _SCIENTIFIC_METRICS or abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return lines


def _row_cells(row: LayerRow) -> list[str]:
    return [row.layer] + [_fmt(getattr(row, metric), metric) for metric, _ in TABLE_COLUMNS]


def _print_report(runs: list[RunHealth], pngs: dict[str, str | None], out: TextIO) -> None:
    for index, run in enumerate(runs):
        if index:
            out.write("\n")
        out.write(f"=== {run.name} | last step {run.last_step} | {len(run.layers)} layers | {run.path} ===\n")
        header = ["layer"] + [heading for _, heading in TABLE_COLUMNS]
        for line in _table(header, [_row_cells(row) for row in layer_rows(run)]):
            out.write(line + "\n")
        nonfinite = first_nonfinite_step(run)
        if nonfinite is not None:
            out.write(f"NaN/Inf first seen at step {nonfinite}\n")
        _print_findings(run, out)
        if run.name in pngs:
            png = pngs[run.name]
            out.write(f"panel: {png}\n" if png else "panel: not drawn (no dead/zero fraction readings)\n")
    if len(runs) > 1:
        out.write("\n")
        _print_comparison(runs, out)


def _print_findings(run: RunHealth, out: TextIO) -> None:
    if run.findings_text:
        step, text = run.findings_text[-1]
        out.write(f"findings logged at step {step}:\n")
        for line in text.splitlines():
            out.write(f"  {line}\n")
    else:
        out.write("findings: none logged\n")


def _comparison(runs: list[RunHealth], threshold: float) -> tuple[list[str], dict[str, dict[str, str]]]:
    layers: dict[str, None] = {}
    for run in runs:
        for layer in run.layers:
            layers.setdefault(layer, None)
    cells: dict[str, dict[str, str]] = {}
    for run in runs:
        onsets = death_onsets(run, threshold)
        per_layer: dict[str, str] = {}
        for layer in layers:
            final = run.latest("dead_fraction", layer)
            if layer not in onsets:
                per_layer[layer] = "-" if layer not in run.layers else "no dead fraction"
            elif onsets[layer] is None:
                per_layer[layer] = f"alive ({_fmt(final, 'dead_fraction')} dead)"
            else:
                per_layer[layer] = f"died at step {onsets[layer]} ({_fmt(final, 'dead_fraction')} dead)"
        cells[run.name] = per_layer
    return list(layers), cells


def _print_comparison(runs: list[RunHealth], out: TextIO) -> None:
    threshold = DEFAULT_DEAD_WARNING
    layers, cells = _comparison(runs, threshold)
    out.write(f"=== comparison: first step each layer's dead fraction exceeded {threshold:.0%} ===\n")
    header = ["layer"] + [run.name for run in runs]
    rows = [[layer] + [cells[run.name][layer] for run in runs] for layer in layers]
    for line in _table(header, rows):
        out.write(line + "\n")


# ------------------------------------------------------------------------------------------------- json


def _json_number(value: float | None) -> float | str | None:
    """JSON has no NaN/Inf: they become the strings "NaN", "Infinity", "-Infinity"."""
    if value is None or math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _report_json(runs: list[RunHealth], pngs: dict[str, str | None]) -> dict[str, object]:
    threshold = DEFAULT_DEAD_WARNING
    payload_runs = []
    for run in runs:
        rows = []
        for row in layer_rows(run):
            rows.append({key: _json_number(v) if isinstance(v, float) else v for key, v in row.as_dict().items()})
        payload_runs.append(
            {
                "name": run.name,
                "path": str(run.path),
                "last_step": run.last_step,
                "layers": rows,
                "death_onsets": death_onsets(run, threshold),
                "first_nonfinite_step": first_nonfinite_step(run),
                "logged_findings": [{"step": step, "text": text} for step, text in run.findings_text],
                "png": pngs.get(run.name),
            }
        )
    return {"dead_threshold": threshold, "runs": payload_runs}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
