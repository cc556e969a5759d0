"""Peak memory in use during a fit, with and without HealthMonitor: the memory target of issue 14.

The step-time benchmark (:mod:`benchmarks.run`) reads peak RSS under glibc's default allocator
settings. Those keep freed blocks for reuse and raise the mmap threshold as large blocks are freed,
so the peak also counts memory that earlier steps freed, and it moves by tens of MiB between
identical runs. Here every trial first calls :func:`benchmarks.harness.hold_no_freed_memory`, so
the resident size follows the memory in use and its peak (``VmHWM``) is the peak of what the fit
held at once. Steps run slower that way (a page fault per touched page of every large block), so
no step time is reported. The resident size also counts pages of shared-library code as they are
first run (a monitor runs kernels a plain fit never calls, a few MiB of ``libtorch_cpu.so``): the
pages gained by the end of the fit (``RssFile``) are shown beside the peak, which they inflate by
at most that much.

Variants, interleaved as in the step-time benchmark (fresh process per trial, 3 warm-up steps, then
60 steps: global steps 0 and 50 are sampled at the default cadence):

* no monitor (``logger=False``) and no monitor with a TensorBoard logger (same work: the spread
  between them is what the measurement itself can resolve);
* ``HealthMonitor(every_n_steps=50)`` as it is (a large parameter's update copied on a sample), with
  every value copied (``update_ratio_sample=None``) and without the update ratio
  (``update_ratio_max_bytes=0``), which separates the copy held through a sampled optimizer step
  from the rest;
* ``HealthMonitor(every_n_steps=1)``.

    python -m benchmarks.peak_memory                 # mlp, cnn, lm; 3 rounds; about 15 min on 2 cores
    python -m benchmarks.peak_memory --quick         # tiny shapes, one round, a smoke run
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Sequence

from benchmarks.harness import BenchmarkConfig, TrialResult, Variant, run_benchmark

VARIANTS = (
    Variant("none", "no monitor", "none", 0),
    Variant("none+tb", "no monitor, TensorBoard logger", "tensorboard", 0),
    Variant("health@50", "HealthMonitor(every_n_steps=50)", "tensorboard", 50),
    Variant("health@50-exact", "HealthMonitor(every_n_steps=50, update_ratio_sample=None)", "tensorboard", 50),
    Variant("health@50-noupdate", "HealthMonitor(every_n_steps=50, update_ratio_max_bytes=0)", "tensorboard", 50),
    Variant("health@1", "HealthMonitor(every_n_steps=1)", "tensorboard", 1),
)


def _versus(rows: Sequence[TrialResult], base: dict[int, float], value: Callable[[TrialResult], float]) -> str:
    """The median of ``value`` against no monitor's, in percent of it, with the range over rounds."""
    middle = statistics.median(value(t) for t in rows)
    reference = statistics.median(base.values())
    per_round = sorted(100 * (value(t) - base[t.repeat]) / base[t.repeat] for t in rows)
    return f"{100 * (middle - reference) / reference:+.1f}% ({per_round[0]:+.1f} to {per_round[-1]:+.1f})"


def _allocated(t: TrialResult) -> float:
    """Peak growth less the library code read in by the end of the fit (MiB): the peak of allocated
    memory when the code was read before the peak (the first sampled step reads it; the peak comes at a
    later one or at the same one), and at most that much below it otherwise."""
    return t.growth_mib - t.file_growth_kib / 1024


def table(trials: Sequence[TrialResult], workloads: Sequence[str]) -> list[str]:
    """A markdown table per workload and variant: the median peak growth, against no monitor's (in
    percent of it, with the range over rounds), the pages of library code read in by the end of the
    fit (file-backed, shared with the page cache: the code of every kernel first run), and the peak
    growth less those pages (:func:`_allocated`) against no monitor's. Code pages are part of the peak
    only as far as they were read before it, so the allocated part of a difference lies between the
    two differences."""
    lines = [
        "| workload | variant | peak growth (MiB) | vs no monitor (range over rounds) "
        "| library code read in by the end (MiB) | peak less code (MiB) | vs no monitor (range) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for workload in workloads:
        mine = [t for t in trials if t.workload == workload]
        base = {t.repeat: t.growth_mib for t in mine if t.variant == "none"}
        base_allocated = {t.repeat: _allocated(t) for t in mine if t.variant == "none"}
        for variant in VARIANTS:
            rows = [t for t in mine if t.variant == variant.name]
            growth = statistics.median(t.growth_mib for t in rows)
            files = statistics.median(t.file_growth_kib / 1024 for t in rows)
            allocated = statistics.median(_allocated(t) for t in rows)
            none = variant.name == "none"
            versus = "-" if none else _versus(rows, base, lambda t: t.growth_mib)
            versus_allocated = "-" if none else _versus(rows, base_allocated, _allocated)
            lines.append(
                f"| {workload} | {variant.label} | {growth:.1f} | {versus} | {files:.1f} | {allocated:.1f} "
                f"| {versus_allocated} |"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = BenchmarkConfig.parser("python -m benchmarks.peak_memory", __doc__.split("\n")[0], "mlp,cnn,lm")
    args = parser.parse_args(argv)
    config = BenchmarkConfig.from_args(
        args,
        VARIANTS,
        steps=60,
        dense_steps=15,
        max_foreign_cpu=float("inf"),  # memory does not depend on other processes' CPU use
        live_memory=True,
    )
    result = run_benchmark(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    lines = table(result.trials, config.workloads)
    print("\n".join(lines), flush=True)
    return lines


if __name__ == "__main__":
    main()
