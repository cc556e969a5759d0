"""Interleaved, timed Lightning fits of every workload under every monitor variant.

How one measurement ("trial") works:

* Each trial is a fresh process forked from a ``forkserver`` that has already imported torch,
  Lightning, W&B and TensorBoard, so a trial starts in milliseconds, leaves nothing behind for the
  next one (hooks, allocator caches, W&B state), and its memory can be read in isolation.
* The trial builds the seeded workload, the variant's logger and callbacks, and runs a real
  ``Trainer.fit`` on the CPU with 2 intra-op threads for ``warmup + steps + 1`` optimizer steps.
* A :class:`StepTimer` (the first callback) stamps ``time.perf_counter()`` at every
  ``on_train_batch_start``; a step's time is the gap to the next stamp, so it covers everything the
  loop does for that batch: every callback hook, forward, backward, optimizer step, the next fetch.
  The first ``warmup`` steps are dropped.
* Peak memory growth is the peak resident set size during the fit (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before) minus the resident size just before the model is built.
  The logger's client (W&B run, TensorBoard writer) is started and the monitor callbacks are made
  (their modules imported) before that baseline, so neither is counted; W&B's separate
  ``wandb-core`` process is never counted. With ``live_memory`` (see
  :func:`hold_no_freed_memory`, used by :mod:`benchmarks.peak_memory`) that peak is the peak of
  memory actually in use; without it, of what glibc's allocator kept from earlier steps as well.

Trials are interleaved: for every workload, ``repeats`` rounds each run every variant once, the
order rotated from round to round, so slow drifts of the machine hit all variants alike.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from benchmarks.workloads import make_workload

NUM_THREADS = 2


@dataclass(frozen=True)
class Variant:
    """One monitoring set-up to time.

    Args:
        name: Short identifier used on the command line and in the table.
        label: What the variant is, for the table.
        logger: ``"none"``, ``"tensorboard"`` or ``"wandb"``: the Trainer's logger in this variant.
        cadence: Every how many steps the variant samples (0: never, 1: every step).
        phase: A step ``s`` is sampled when ``(s + phase) % cadence == 0``: 0 for monitors that
            sample global steps 0, N, 2N ..., 1 for ``wandb.watch``, which logs on its N-th batch.
    """

    name: str
    label: str
    logger: str
    cadence: int
    phase: int = 0

    def sampled(self, global_step: int) -> bool:
        """Whether the monitor does its work on the step that starts at ``global_step``."""
        return self.cadence > 0 and (global_step + self.phase) % self.cadence == 0


VARIANTS: tuple[Variant, ...] = (
    Variant("none", "no monitor", "none", 0),
    Variant("none+tb", "no monitor, TensorBoard logger", "tensorboard", 0),
    Variant("health@50", "HealthMonitor(every_n_steps=50)", "tensorboard", 50),
    Variant("health@1", "HealthMonitor(every_n_steps=1)", "tensorboard", 1),
    Variant("health@1c", "HealthMonitor(every_n_steps=1, compile_reductions=True)", "tensorboard", 1),
    Variant("wandb@50", 'wandb.watch(log="all", log_freq=50)', "wandb", 50, phase=1),
    Variant("wandb@1", 'wandb.watch(log="all", log_freq=1)', "wandb", 1),
    Variant("bolts@1", "bolts-style ModuleDataMonitor, every step", "tensorboard", 1),
    Variant("hostcopy@1", "host-copy textbook monitor, every step", "tensorboard", 1),
)
VARIANTS_BY_NAME: dict[str, Variant] = {v.name: v for v in VARIANTS}


def make_callbacks(variant: Variant) -> list[Callback]:
    """The monitor callbacks of ``variant`` (empty for ``none``)."""
    if variant.name.startswith("health@"):
        from lightning_health import HealthMonitor

        compiled = variant.name.endswith("c")
        # "-noupdate": without the update-ratio readings (benchmarks/update_ratio_cost.py); "-exact": the
        # update ratio from a copy of every value, not a sample (benchmarks/peak_memory.py)
        extra: dict[str, Any] = {}
        if variant.name.endswith("-noupdate"):
            extra = {"update_ratio_max_bytes": 0}
        elif variant.name.endswith("-exact"):
            extra = {"update_ratio_sample": None}
        return [HealthMonitor(every_n_steps=variant.cadence, compile_reductions=compiled, verbose=False, **extra)]
    if variant.name.startswith("wandb@"):
        from benchmarks.anchors import WandbWatch

        return [WandbWatch(log_freq=variant.cadence)]
    if variant.name.startswith("bolts@"):
        from benchmarks.anchors import ModuleDataMonitor

        return [ModuleDataMonitor(log_every_n_steps=variant.cadence)]
    if variant.name.startswith("hostcopy@"):
        from benchmarks.anchors import HostCopyMonitor

        return [HostCopyMonitor(every_n_steps=variant.cadence)]
    return []


class StepTimer(Callback):
    """Stamps ``(global_step, perf_counter())`` at the start of every training batch."""

    def __init__(self) -> None:
        self.stamps: list[tuple[int, float]] = []

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.stamps.append((trainer.global_step, time.perf_counter()))

    def step_times(self, warmup: int) -> list[tuple[int, float]]:
        """``(global_step, seconds)`` of every step but the first ``warmup`` and the last (which has no end)."""
        pairs = zip(self.stamps, self.stamps[1:], strict=False)
        return [(step, end - start) for (step, start), (_, end) in pairs][warmup:]


def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not found in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # "5" resets the peak RSS (VmHWM) to the current RSS; Linux >= 4.0


def _process_ticks(pid: int) -> tuple[int, int]:
    """(parent pid, utime + stime of all its threads) of ``pid``; (0, 0) if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            parts = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0
    return int(parts[1]), int(parts[11]) + int(parts[12])


def _cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process and its children), from ``/proc``.

    Children (W&B's ``wandb-core`` service) count as ours: their work is part of the variant's cost.
    """
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # everything but idle and iowait
    me = os.getpid()
    own = _process_ticks(me)[1]
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            parent, ticks = _process_ticks(int(entry))
            if parent == me:
                own += ticks
    return busy, own


@dataclass
class TrialResult:
    """What one trial measured.

    ``foreign_cpu`` is the busy CPU time of processes other than the trial and its children during
    the fit, in cores (0.3 = 30% of one core). A large value means the trial competed for the CPU.
    """

    workload: str
    variant: str
    repeat: int
    step_times: list[tuple[int, float]]
    rss_before_kib: int
    peak_rss_kib: int
    wall_s: float
    foreign_cpu: float = 0.0
    file_growth_kib: int = 0  # resident pages of files (shared-library code) gained during the fit

    @property
    def growth_mib(self) -> float:
        """Peak RSS during the fit minus RSS before the model was built, in MiB."""
        return (self.peak_rss_kib - self.rss_before_kib) / 1024


@dataclass(frozen=True)
class TrialSpec:
    """Everything a trial process needs; picklable."""

    workload: str
    variant: Variant
    repeat: int
    warmup: int
    steps: int
    tiny: bool
    seed: int
    workdir: str
    live_memory: bool = False  # see hold_no_freed_memory


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def hold_no_freed_memory() -> None:
    """Make this process's resident size follow the memory it uses: blocks of 64 KiB or more are
    mapped on allocation and returned on free, and freed heap tops are trimmed.

    By default glibc raises its mmap threshold to the largest block freed so far (up to 32 MiB)
    and keeps freed blocks for reuse, so a fit's peak RSS also counts memory freed earlier and
    moves by tens of MiB between identical runs (the two no-monitor rows of the step-time table).
    The price is a page fault per touched page of every large allocation: steps run slower, so
    step times are never taken from trials run this way.
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    if not (libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024) and libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)):
        raise RuntimeError("mallopt refused the thresholds: peak live memory cannot be measured here")


def _quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "wandb"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _make_logger(kind: str, workdir: str) -> Any:
    if kind == "none":
        return False
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=workdir, name="tb", default_hp_metric=False)
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(save_dir=workdir, offline=True, project="lightning_health-bench", log_model=False)
    raise ValueError(f"Expected `logger` to be 'none', 'tensorboard' or 'wandb', got {kind!r}")


def run_trial(spec: TrialSpec) -> TrialResult:
    """Run one timed fit in the current process (normally a fresh trial process)."""
    import torch

    _quiet()
    if spec.live_memory:
        hold_no_freed_memory()
    torch.set_num_threads(NUM_THREADS)
    started = time.perf_counter()
    logger = _make_logger(spec.variant.logger, spec.workdir)
    if logger:
        _ = logger.experiment  # start the logging client before the memory baseline
    callbacks = make_callbacks(spec.variant)  # their imports too: a fixed cost of a package, not of the fit
    gc.collect()
    _reset_peak_rss()
    rss_before, file_before = _proc_status_kib("VmRSS"), _proc_status_kib("RssFile")
    total = spec.warmup + spec.steps + 1
    module, loader = make_workload(spec.workload, num_batches=total, tiny=spec.tiny, seed=spec.seed)
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=total,
        max_epochs=1,
        logger=logger,
        callbacks=[timer, *callbacks],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=spec.workdir,
    )
    busy_before, own_before = _cpu_ticks()
    fit_start = time.perf_counter()
    trainer.fit(module, loader)
    fit_s = time.perf_counter() - fit_start
    busy_after, own_after = _cpu_ticks()
    peak, file_after = _proc_status_kib("VmHWM"), _proc_status_kib("RssFile")
    foreign = ((busy_after - busy_before) - (own_after - own_before)) / os.sysconf("SC_CLK_TCK") / fit_s
    if spec.variant.logger == "wandb":
        import wandb

        wandb.finish()
    return TrialResult(
        workload=spec.workload,
        variant=spec.variant.name,
        repeat=spec.repeat,
        step_times=timer.step_times(spec.warmup),
        rss_before_kib=rss_before,
        peak_rss_kib=peak,
        wall_s=time.perf_counter() - started,
        foreign_cpu=max(foreign, 0.0),
        file_growth_kib=max(file_after - file_before, 0),
    )


def _trial_process(spec: TrialSpec, conn: Any) -> None:
    try:
        conn.send(("ok", run_trial(spec)))
    except BaseException as error:  # report any failure to the parent instead of dying silently
        import traceback

        conn.send(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    finally:
        conn.close()


_PRELOAD = [
    "torch",
    "numpy",
    "lightning.pytorch",
    "lightning.pytorch.loggers",
    "torch.utils.tensorboard",
    "wandb",
    "benchmarks.workloads",
    "benchmarks.anchors",
    "benchmarks.harness",
    "lightning_health",
]


@dataclass
class BenchmarkConfig:
    """Sizes of one benchmark run (see ``python -m benchmarks.run --help``)."""

    workloads: Sequence[str]
    variants: Sequence[Variant]
    steps: int = 60
    dense_steps: int = 15
    warmup: int = 3
    repeats: int = 3
    tiny: bool = False
    seed: int = 0
    max_foreign_cpu: float = 0.25
    max_retries: int = 3
    live_memory: bool = False  # peak of memory in use (slower steps): benchmarks/peak_memory.py

    @classmethod
    def sized(
        cls,
        workloads: Sequence[str],
        variants: Sequence[Variant],
        *,
        quick: bool,
        repeats: int,
        steps: int,
        dense_steps: int,
        **options: Any,
    ) -> BenchmarkConfig:
        """A command line's config; ``quick``: tiny shapes, one round, a few steps (a smoke run)."""
        return cls(
            workloads=workloads,
            variants=variants,
            steps=8 if quick else steps,
            dense_steps=4 if quick else dense_steps,
            warmup=1 if quick else 3,
            repeats=1 if quick else repeats,
            tiny=quick,
            **options,
        )

    @staticmethod
    def parser(prog: str, description: str, workloads: str) -> argparse.ArgumentParser:
        """A trial benchmark's command line: ``--workloads``, ``--repeats`` and ``--quick`` (the
        arguments :meth:`sized` takes); the benchmark adds its own."""
        parser = argparse.ArgumentParser(prog=prog, description=description)
        split = lambda text: [w for w in text.split(",") if w]  # noqa: E731 - a default string is split too
        parser.add_argument("--workloads", type=split, default=workloads, help=f"comma-separated ({workloads})")
        parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
        parser.add_argument("--quick", action="store_true", help="tiny shapes, one round, a few steps (a smoke run)")
        return parser

    @classmethod
    def from_args(cls, args: argparse.Namespace, variants: Sequence[Variant], **options: Any) -> BenchmarkConfig:
        """:meth:`sized` from the command line of :meth:`parser`; ``options``: steps, dense_steps and the rest."""
        return cls.sized(args.workloads, variants, quick=args.quick, repeats=args.repeats, **options)

    def steps_for(self, variant: Variant) -> int:
        """Timed steps per trial: every-step variants need fewer to resolve their (large) ratios."""
        return self.dense_steps if variant.cadence == 1 else self.steps


@dataclass
class BenchmarkResult:
    """All trials of one run, in the order they ran."""

    config: BenchmarkConfig
    trials: list[TrialResult] = field(default_factory=list)
    wall_s: float = 0.0
    retries: int = 0  # trials run again because other processes took more than `max_foreign_cpu`


def run_benchmark(config: BenchmarkConfig, progress: Callable[[str], None] | None = None) -> BenchmarkResult:
    """Run every trial of ``config``, interleaving the variants round by round.

    Args:
        config: Workloads, variants and sizes.
        progress: Called with one line per finished trial (e.g. ``print`` to stderr).

    Returns:
        Every trial's measurements.

    Raises:
        RuntimeError: If a trial fails; the message carries the trial's traceback.
    """
    started = time.perf_counter()
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    result = BenchmarkResult(config=config)
    variants = list(config.variants)
    with tempfile.TemporaryDirectory(prefix="lh-bench-") as root:
        os.environ["WANDB_DIR"] = root
        for workload in config.workloads:
            for repeat in range(config.repeats):
                shift = repeat % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    workdir = tempfile.mkdtemp(dir=root, prefix=f"{workload}-{variant.name}-{repeat}-")
                    spec = TrialSpec(
                        workload=workload,
                        variant=variant,
                        repeat=repeat,
                        warmup=config.warmup,
                        steps=config.steps_for(variant),
                        tiny=config.tiny,
                        seed=config.seed,
                        workdir=workdir,
                        live_memory=config.live_memory,
                    )
                    for attempt in range(config.max_retries + 1):
                        trial = _spawn(ctx, spec)
                        if progress is not None:
                            times = sorted(t for _, t in trial.step_times)
                            median = times[len(times) // 2] * 1e3 if times else float("nan")
                            progress(
                                f"{workload:>4} r{repeat} {variant.name:<11} median {median:8.2f} ms/step"
                                f"  growth {trial.growth_mib:7.1f} MiB  other CPU {trial.foreign_cpu:4.2f}"
                                f"  ({trial.wall_s:.1f} s)"
                            )
                        if trial.foreign_cpu <= config.max_foreign_cpu or attempt == config.max_retries:
                            break
                        result.retries += 1
                        if progress is not None:
                            progress("     ^ other processes competed for the CPU: running this trial again")
                    result.trials.append(trial)
    result.wall_s = time.perf_counter() - started
    return result


def _spawn(ctx: Any, spec: TrialSpec) -> TrialResult:
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_trial_process, args=(spec, sender), daemon=True)
    process.start()
    sender.close()
    try:
        status, payload = receiver.recv()
    except EOFError:
        status, payload = "error", f"trial process exited with code {process.exitcode} before reporting"
    process.join()
    if status != "ok":
        raise RuntimeError(f"Trial {spec.workload}/{spec.variant.name}/r{spec.repeat} failed:\n{payload}")
    return payload


def python_version() -> str:
    """``major.minor.micro`` of this interpreter."""
    return ".".join(map(str, sys.version_info[:3]))
