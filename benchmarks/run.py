"""Command line of the benchmark: ``python -m benchmarks.run`` from the repository root.

Runs every workload under every monitor variant, interleaved, writes the markdown report (by default
``docs/performance.md``) and prints it. ``--quick`` runs tiny workloads for a few steps: it checks
that the harness works, its numbers mean nothing.

Example::

    python -m benchmarks.run                                  # the full run, a few minutes on 2 cores
    python -m benchmarks.run --workloads mlp --repeats 5      # one workload, more repeats
    python -m benchmarks.run --quick --out /tmp/perf.md       # smoke run, seconds
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks.harness import VARIANTS, VARIANTS_BY_NAME, BenchmarkConfig, python_version, run_benchmark
from benchmarks.workloads import WORKLOADS


def _csv(allowed: tuple[str, ...], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"Expected `{what}` from {', '.join(allowed)}, got {text!r}")
        return items

    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"Expected a positive int, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by the smoke test)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", type=_csv(WORKLOADS, "workloads"), default=list(WORKLOADS))
    parser.add_argument(
        "--variants", type=_csv(tuple(VARIANTS_BY_NAME), "variants"), default=[v.name for v in VARIANTS]
    )
    parser.add_argument("--steps", type=_positive, help="timed steps per trial (default 60; quick 3)")
    parser.add_argument("--dense-steps", type=_positive, help="timed steps per every-step trial (default 15; quick 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps at the start of each trial (default 3; quick 1)")
    parser.add_argument("--repeats", type=_positive, help="interleaved rounds per workload (default 3; quick 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-other-cpu",
        type=float,
        default=0.25,
        help="re-run a trial when other processes used more CPU than this, in cores (default 0.25)",
    )
    parser.add_argument("--max-retries", type=int, default=3, help="re-runs per trial at most (default 3)")
    parser.add_argument("--quick", action="store_true", help="tiny workloads, a few steps: checks the harness")
    parser.add_argument("--no-micro", action="store_true", help="skip the reductions micro-benchmark")
    parser.add_argument(
        "--out", type=Path, help="markdown report to write (default docs/performance.md; with --quick: none)"
    )
    return parser


def machine_info() -> dict[str, str]:
    """Date, CPU, core count and library versions, for the report header."""
    import lightning
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu}; nproc {len(os.sched_getaffinity(0))}; {platform.system()} {platform.release()}",
        "software": f"Python {python_version()}, torch {torch.__version__}, lightning {lightning.__version__}",
        "threads": "torch.set_num_threads(2)",
    }


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark and return the markdown report (also written to ``--out`` and printed)."""
    args = build_parser().parse_args(argv)
    quick = args.quick
    config = BenchmarkConfig(
        workloads=args.workloads,
        variants=[VARIANTS_BY_NAME[name] for name in args.variants],
        steps=args.steps or (3 if quick else 60),
        dense_steps=args.dense_steps or (2 if quick else 15),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 3),
        repeats=args.repeats or (1 if quick else 3),
        tiny=quick,
        seed=args.seed,
        max_foreign_cpu=args.max_other_cpu,
        max_retries=0 if quick else args.max_retries,
    )
    if "none" not in args.variants:
        raise SystemExit("Expected `--variants` to include 'none': every ratio is relative to it")
    if any(name.startswith("health@") for name in args.variants):
        try:
            from lightning_health import HealthMonitor  # noqa: F401
        except ImportError as error:
            raise SystemExit(
                f"HealthMonitor cannot be imported ({error}); run from the repository root of a checkout that"
                " has the core, or leave the health@ variants out with --variants"
            ) from error

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = run_benchmark(config, progress=progress)

    from benchmarks.report import render_markdown, summarise
    from benchmarks.workloads import describe

    micro_section = ""
    if not args.no_micro:
        from benchmarks.micro import micro_markdown

        micro_section = micro_markdown(config.workloads, tiny=quick, repeats=3 if quick else 20)
    command = shlex.join(["python", "-m", "benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
    report = render_markdown(
        result,
        summarise(result),
        machine=machine_info(),
        command=command,
        workload_titles={name: describe(name, tiny=quick) for name in config.workloads},
        micro_section=micro_section,
    )
    out = args.out if args.out is not None else (None if quick else Path("docs/performance.md"))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        progress(f"wrote {out}")
    print(report)
    return report


if __name__ == "__main__":
    main()
