"""The ``lightning-health`` command.

``lightning-health report PATH... [--png FILE [--per-run]] [--json]`` reads health readings back from
TensorBoard event files and prints, per run, the per-layer table and the findings, and with several
runs a comparison of which layers died and when. ``lightning-health demo [--out DIR]`` trains a
healthy, a dying and an exploding network on the CPU and prints what the monitor found in each.

Exit codes: 0 on success, 2 when a path does not exist or holds no health readings (after reporting
every path that does), when an output cannot be written, and argparse's 2 for bad arguments. Every
problem is one line on standard error; a truncated or corrupt event file is a warning that says what
was read.

Example:
    >>> main(["report", "/nonexistent/runs"])  # doctest: +SKIP
    lightning-health: /nonexistent/runs does not exist
    2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from lightning_health.diagnosis import Finding, Thresholds, diagnose_curves
from lightning_health.diagnosis.replay import DEFAULT_WINDOW
from lightning_health.offline.event_reader import RunHealth, make_names_unique, read_path
from lightning_health.offline.run_summary import (
    course_of_disease,
    death_onsets,
    first_nonfinite_step,
    latest_readings,
    nonfinite_onsets,
    status_series,
)
from lightning_health.sinks.console import HealthReport, print_report

PROG = "lightning-health"
EXIT_OK = 0
EXIT_NO_DATA = 2


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
        help="also draw every run's panel charts side by side to FILE (PNG)",
    )
    report.add_argument(
        "--per-run",
        action="store_true",
        help="with --png, also draw one panel per run next to FILE (FILE's stem + the run's name)",
    )
    report.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    report.add_argument(
        "--window",
        type=_positive_int,
        default=DEFAULT_WINDOW,
        metavar="N",
        help=(
            f"the runs' HealthMonitor dead_window (default: {DEFAULT_WINDOW}, its default): the sampled steps "
            "the stalled/unstable rules judge together, as they did during the run"
        ),
    )
    report.set_defaults(handler=_report_command)

    demo = commands.add_parser(
        "demo",
        help="train a healthy, a dying and an exploding network on the CPU and diagnose each",
        description=(
            "Train the same 8-16-16-16-16-4 ReLU MLP three times on the CPU: healthy (Kaiming init, lr 0.05), "
            "dying (Kaiming init, lr 0.2, a bias penalty of the wrong sign: units die, no NaN) and exploding "
            "(N(0,1) init, lr 0.8: NaN from step 3), with TensorBoard logs under DIR, and print each diagnosis."
        ),
    )
    demo.add_argument("--out", default="runs", metavar="DIR", help="TensorBoard log directory (default: ./runs)")
    demo.add_argument("--epochs", type=_positive_int, default=30, help="epochs per patient (default: 30)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    demo.set_defaults(handler=_demo_command)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


# ----------------------------------------------------------------------------------------------- report


def _report_command(args: argparse.Namespace) -> int:
    if args.per_run and not args.png:
        print(f"{PROG}: --per-run needs --png FILE", file=sys.stderr)
        return EXIT_NO_DATA
    runs, problems = _collect_runs(args.paths)
    for problem in problems:
        print(f"{PROG}: {problem}", file=sys.stderr)
    for run in runs:
        for damage in run.problems:
            print(f"{PROG}: warning: {run.name}: {damage}", file=sys.stderr)
    if not runs:
        return EXIT_NO_DATA

    pngs: dict[str, str | None] = {}
    png_failed = False
    try:
        pngs = _write_pngs(runs, args.png, args.per_run) if args.png else {}
    except OSError as err:  # the report is still printed: the readings were fine, only the picture failed
        print(f"{PROG}: cannot write --png {args.png}: {err.strerror or err}; pick a writable path", file=sys.stderr)
        png_failed = True
    if args.json:
        json.dump(_report_json(runs, pngs, args.window), sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        _print_report(runs, pngs, sys.stdout, args.window)
    return EXIT_NO_DATA if problems or png_failed else EXIT_OK


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


def _write_pngs(runs: list[RunHealth], base: str, per_run: bool) -> dict[str, str | None]:
    """The comparison figure at ``base`` (key ``""``), and with ``per_run`` one panel per run next to it."""
    from lightning_health.sinks.compare import save_comparison
    from lightning_health.sinks.panel import save_run_panel

    target = Path(base)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_comparison(runs, target)
    written: dict[str, str | None] = {"": str(target)}
    for run in runs if per_run else []:
        path = _png_path(base, run, several=True)
        written[run.name] = str(path) if save_run_panel(run, path) else None
    return written


# --------------------------------------------------------------------------------------------- rendering


def _fmt_percent(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100.0 * value:.0f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return lines


def _diagnose(run: RunHealth, window: int = DEFAULT_WINDOW) -> list[Finding]:
    # The event files do not say which layers are rectifiers, so the dead rule is applied to every layer.
    return diagnose_curves(
        run.curves, Thresholds(), layer_order=run.layers, window=window, skipped_steps=run.amp_skipped_steps
    )


def _health_report(run: RunHealth, findings: list[Finding]) -> HealthReport:
    # Layers with only parameter-gradient norms (the Linear layers around the activations) have no row.
    latest = {layer: values for layer, values in latest_readings(run).items() if "act_mean" in values}
    return HealthReport.from_latest(run.name, run.last_step or 0, latest, findings)


def _print_chart(report: HealthReport, out: TextIO) -> None:
    """rich on a terminal, fixed-width plain text otherwise (pipes, files, tests)."""
    if out.isatty():
        print_report(report, file=out)
    else:
        out.write(report.render_text() + "\n")


def _print_report(
    runs: list[RunHealth], pngs: dict[str, str | None], out: TextIO, window: int = DEFAULT_WINDOW
) -> None:
    for index, run in enumerate(runs):
        if index:
            out.write("\n")
        findings = _diagnose(run, window)
        _print_chart(_health_report(run, findings), out)
        for damage in run.problems:  # a truncated file: say on stdout too that this report is partial
            out.write(f"note: {damage}\n")
        course = course_of_disease(findings)
        if course:
            out.write("course of disease:\n" + "".join(f"  {line}\n" for line in course))
        nonfinite = first_nonfinite_step(run)
        if nonfinite is not None:
            out.write(f"NaN/Inf first seen at step {nonfinite}\n")
        if run.name in pngs:
            png = pngs[run.name]
            out.write(f"panel: {png}\n" if png else "panel: not drawn (no dead/zero fraction readings)\n")
    if len(runs) > 1:
        out.write("\n")
        _print_comparison(runs, out)
    if "" in pngs:
        out.write(f"\nall runs side by side: {pngs['']}\n")


def _comparison(runs: list[RunHealth], threshold: float) -> tuple[list[str], dict[str, dict[str, str]]]:
    layers: dict[str, None] = {}
    for run in runs:
        for layer in run.curves.get("dead_fraction", {}):
            layers.setdefault(layer, None)
    cells: dict[str, dict[str, str]] = {}
    for run in runs:
        onsets, broken = death_onsets(run, threshold), nonfinite_onsets(run)
        per_layer: dict[str, str] = {}
        for layer in layers:
            points = run.curves.get("dead_fraction", {}).get(layer, [])
            finite = [value for _, value in points if math.isfinite(value)]
            peak, last = _fmt_percent(max(finite, default=None)), _fmt_percent(run.latest("dead_fraction", layer))
            if layer not in onsets:
                per_layer[layer] = "-"
            elif layer in broken:  # NaN is not "alive": its dead fraction is unknown from then on
                died = f"died at step {onsets[layer]}, " if onsets[layer] is not None else ""
                per_layer[layer] = f"{died}NaN/Inf from step {broken[layer]}"
            elif onsets[layer] is None:
                per_layer[layer] = f"alive (peak {peak} dead)"
            else:
                per_layer[layer] = f"died at step {onsets[layer]} (peak {peak}, last {last} dead)"
        cells[run.name] = per_layer
    return list(layers), cells


def _print_comparison(runs: list[RunHealth], out: TextIO) -> None:
    threshold = Thresholds().dead_warning
    layers, cells = _comparison(runs, threshold)
    out.write(f"=== comparison: first step each layer's dead fraction exceeded {threshold:.0%} ===\n")
    header = ["layer"] + [run.name for run in runs]
    rows = [[layer] + [cells[run.name][layer] for run in runs] for layer in layers]
    for line in _table(header, rows):
        out.write(line + "\n")


# ------------------------------------------------------------------------------------------------- json


def _json_value(value: object) -> object:
    """JSON has no NaN/Inf: they become the strings "NaN", "Infinity", "-Infinity"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    return value


def _report_json(runs: list[RunHealth], pngs: dict[str, str | None], window: int = DEFAULT_WINDOW) -> dict[str, object]:
    threshold = Thresholds().dead_warning
    payload_runs = []
    for run in runs:
        findings = _diagnose(run, window)
        payload_runs.append(
            {
                "name": run.name,
                "path": str(run.path),
                "last_step": run.last_step,
                "latest": latest_readings(run),
                "findings": [dataclasses.asdict(finding) for finding in findings],
                "course_of_disease": course_of_disease(findings),
                "death_onsets": death_onsets(run, threshold),
                "first_nonfinite_step": first_nonfinite_step(run),
                "logged_findings": [{"step": step, "text": text} for step, text in run.findings_text],
                "png": pngs.get(run.name),
                "status": status_series(run),
                "problems": run.problems,
            }
        )
    return _json_value({"dead_threshold": threshold, "runs": payload_runs, "png": pngs.get("")})  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------- demo


def _writable_dir(path: Path) -> str | None:
    """``None`` when ``path`` is (or can be made) a writable directory, else why not, in words."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".lightning_health_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return err.strerror or str(err)
    return None


def _demo_command(args: argparse.Namespace) -> int:
    from lightning_health.offline.demo import EVERY_STEP_FLAG, PATIENTS, quiet_training, train_patient

    out_dir = Path(args.out)
    why = _writable_dir(out_dir)
    if why is not None:
        print(f"{PROG}: cannot write the demo runs to --out {out_dir}: {why}; pick a writable folder", file=sys.stderr)
        return EXIT_NO_DATA
    stream = sys.stdout
    stream.write(
        f"{len(PATIENTS)} patients, one network: the same 8-16-16-16-16-4 ReLU MLP on the same 80 samples, "
        "plain SGD.\n"
        f"Each is read by HealthMonitor at every step; TensorBoard runs go to {out_dir}/.\n"
    )
    for patient in PATIENTS:
        stream.write(f"\n>>> training the {patient.label} patient for {args.epochs} epochs\n")
        stream.flush()
        try:
            with quiet_training():
                run = train_patient(patient, out_dir, epochs=args.epochs, progress=not args.no_progress)
        except OSError as err:
            print(f"{PROG}: cannot write the demo runs to --out {out_dir}: {err}", file=sys.stderr)
            return EXIT_NO_DATA
        report = run.monitor.report(
            f"{patient.label} | loss {run.final_loss:.3g}" if run.final_loss is not None else patient.label
        )
        report.rows = [row for row in report.rows if row.act_mean is not None or row.dead_fraction is not None]
        _print_chart(report, stream)
        findings = run.monitor.diagnose()
        stream.write(f"\nWhat went wrong in the {patient.name} run:\n" if findings else "")
        for line in course_of_disease(findings):
            stream.write(f"  {line}\n")
        if not findings:
            stream.write(f"The {patient.name} run: nothing went wrong.\n")
    stream.write(
        f"\nOpen the runs side by side:  tensorboard --logdir {out_dir} {EVERY_STEP_FLAG}\n"
        f"Or read them back here:      {PROG} report {out_dir} --png health.png\n"
    )
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
