"""What the update-ratio readings cost: HealthMonitor with them against the same monitor without them.

The readings (``update_ratio`` and ``param_norm``, see lightning_health/pipeline/learning.py) are on by
default; ``HealthMonitor(update_ratio_max_bytes=0)`` turns the update ratio off (``param_norm`` is
read either way). Four variants, each a real ``Trainer.fit`` in a fresh process through
:mod:`benchmarks.harness` (interleaved rounds, the order rotated each round, peak RSS from
``VmHWM``): the default cadence (every 50 steps) and every step, each with and without.

Printed per workload:

* *every step*: median step with the readings over median step without (the per-round range):
  every step pays the snapshot, the subtraction and the norms.
* *per sampled step*: the difference of those medians, in ms: what one sampled step pays for them.
* *at the default cadence, est.*: ``1 + per sampled step / 50 / median step without``: unsampled
  steps do no update-ratio work at all, so this is the cost spread over a run.
* *at the default cadence, measured*: median step with over without at ``every_n_steps=50``
  (hundreds of idle steps, a few sampled ones: the run-to-run noise is larger than the effect).
* *readings alone*: the update-ratio work of one sampled step (norms, copy, difference) timed in
  process CPU time (one thread) around the optimizer step of the bare workload (:func:`direct_cost`),
  against a plain one-thread step: the same question, far less sensitive to other processes.
* *snapshot*: the bytes the weight copy held at its peak (``UpdateTracker.peak_bytes``, exact), and
  the peak RSS growth with and without (``VmHWM`` minus RSS before the model is built, median over
  rounds). tracemalloc does not see torch's CPU allocator, and torch has no CPU peak-memory counter,
  so process RSS is what is measurable here.

    OMP_NUM_THREADS=1 python -m benchmarks.update_ratio_cost            # mlp and lm, ~10 min on 2 cores
    OMP_NUM_THREADS=1 python -m benchmarks.update_ratio_cost --quick    # tiny shapes, seconds
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence

from benchmarks.harness import BenchmarkConfig, TrialResult, Variant, run_benchmark

CADENCE = 50
VARIANTS = (
    Variant(f"health@{CADENCE}", f"HealthMonitor(every_n_steps={CADENCE})", "tensorboard", CADENCE),
    Variant(f"health@{CADENCE}-noupdate", "... update_ratio_max_bytes=0", "tensorboard", CADENCE),
    Variant("health@1", "HealthMonitor(every_n_steps=1)", "tensorboard", 1),
    Variant("health@1-noupdate", "... every_n_steps=1, update_ratio_max_bytes=0", "tensorboard", 1),
)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _steps(trials: Sequence[TrialResult], variant: str, repeat: int | None = None) -> list[float]:
    return [
        t
        for trial in trials
        if trial.variant == variant and (repeat is None or trial.repeat == repeat)
        for _, t in trial.step_times
    ]


def snapshot_bytes(workload: str, tiny: bool) -> int:
    """The update-ratio snapshot's peak bytes in a short fit of ``workload`` (every step, default budget)."""
    import lightning.pytorch as pl

    from benchmarks.harness import _quiet
    from benchmarks.workloads import make_workload
    from lightning_health import HealthMonitor

    _quiet()

    class Peek(pl.Callback):
        peak = 0

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            runtime = monitor._runtime
            Peek.peak = runtime.updates.peak_bytes if runtime is not None else 0

    monitor = HealthMonitor(every_n_steps=1, verbose=False)
    module, loader = make_workload(workload, num_batches=2, tiny=tiny)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        callbacks=[monitor, Peek()],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, loader)
    return Peek.peak


def direct_cost(workload: str, tiny: bool, repeats: int = 30, exact: bool = False) -> tuple[float, float]:
    """CPU ms of one plain training step, and of the update-ratio work of one sampled step, in process.

    ``exact``: every value copied (``update_ratio_sample=None``) instead of the monitor's default sample.

    The readings alone, without the rest of the monitor: ``UpdateTracker.before_step`` (norms and the
    copy), the optimizer's step, ``after_step`` (difference and norms); minus the same step without
    them. Interleaved, medians over ``repeats``, one thread, timed in process CPU time, which a busy
    machine disturbs far less than wall time.
    """
    import torch

    from benchmarks.workloads import make_workload
    from lightning_health import HealthMonitor
    from lightning_health.pipeline.learning import UpdateTracker
    from lightning_health.pipeline.param_grads import layer_param_groups

    sample = None if exact else HealthMonitor(verbose=False).update_ratio_sample
    torch.set_num_threads(1)  # no worker threads spinning while they wait: CPU time is work done
    module, loader = make_workload(workload, num_batches=1, tiny=tiny)
    batch = next(iter(loader))
    opt = module.configure_optimizers()
    tracker = UpdateTracker(layer_param_groups([(n, m) for n, m in module.named_modules() if n]), 2**29, sample)

    def backward() -> None:
        opt.zero_grad()
        module.training_step(batch, 0).backward()

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        start = time.process_time()
        fn()
        return time.process_time() - start

    def with_readings() -> None:
        tracker.before_step(opt)
        opt.step()
        tracker.after_step()

    plain, bare, read = [], [], []
    for _ in range(3):  # warm-up: optimizer state, allocator
        backward()
        with_readings()
    for _ in range(repeats):
        backward()
        bare.append(timed(opt.step))
        backward()
        read.append(timed(with_readings))
        plain.append(timed(lambda: (backward(), opt.step())))
    return statistics.median(plain) * 1e3, (statistics.median(read) - statistics.median(bare)) * 1e3


def summarise(workload: str, trials: Sequence[TrialResult], repeats: int, snapshot: int) -> list[str]:
    """The lines printed for one workload."""
    on1, off1 = "health@1", "health@1-noupdate"
    on_n, off_n = f"health@{CADENCE}", f"health@{CADENCE}-noupdate"
    every = _median(_steps(trials, on1)) / _median(_steps(trials, off1))
    rounds = [_median(_steps(trials, on1, r)) / _median(_steps(trials, off1, r)) for r in range(repeats)]
    extra_ms = (_median(_steps(trials, on1)) - _median(_steps(trials, off1))) * 1e3
    plain_ms = _median(_steps(trials, off_n)) * 1e3
    measured = _median(_steps(trials, on_n)) / _median(_steps(trials, off_n))
    growth = {v.name: _median([t.growth_mib for t in trials if t.variant == v.name]) for v in VARIANTS}
    other = max((t.foreign_cpu for t in trials), default=0.0)
    return [
        f"## {workload}",
        f"every step: {every:.3f}x ({min(rounds):.3f}-{max(rounds):.3f} over {repeats} rounds); "
        f"per sampled step +{extra_ms:.2f} ms",
        f"at every_n_steps={CADENCE}: est. {1 + extra_ms / CADENCE / plain_ms:.4f}x "
        f"(median step without {plain_ms:.2f} ms); measured {measured:.3f}x",
        f"snapshot peak {snapshot / 2**20:.2f} MiB ({snapshot} bytes); peak RSS growth every step "
        f"{growth[on1]:.1f} MiB with, {growth[off1]:.1f} MiB without; at every_n_steps={CADENCE} "
        f"{growth[on_n]:.1f} MiB with, {growth[off_n]:.1f} MiB without",
        f"other processes used up to {other:.2f} cores during a kept trial",
    ]


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = BenchmarkConfig.parser("python -m benchmarks.update_ratio_cost", __doc__.split("\n")[0], "mlp,lm")
    parser.add_argument("--steps", type=int, default=100, help=f"timed steps of the every-{CADENCE} variants")
    parser.add_argument("--dense-steps", type=int, default=20, help="timed steps of the every-step variants")
    parser.add_argument("--retries", type=int, default=3, help="re-runs of a trial that other processes slowed")
    args = parser.parse_args(argv)
    config = BenchmarkConfig.from_args(
        args,
        VARIANTS,
        steps=args.steps,
        dense_steps=args.dense_steps,
        max_retries=args.retries,
    )
    result = run_benchmark(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    lines = []
    for workload in config.workloads:
        trials = [t for t in result.trials if t.workload == workload]
        lines += summarise(workload, trials, config.repeats, snapshot_bytes(workload, args.quick))
        for exact, label in ((False, "sampled copy, the default"), (True, "every value copied")):
            step_ms, extra_ms = direct_cost(workload, args.quick, exact=exact)
            lines.append(
                f"readings alone ({label}; process CPU time): +{extra_ms:.2f} ms per sampled step on a "
                f"{step_ms:.1f} ms step: every step {1 + extra_ms / step_ms:.3f}x, every {CADENCE} steps "
                f"{1 + extra_ms / step_ms / CADENCE:.4f}x"
            )
    print("\n".join(lines), flush=True)
    return lines


if __name__ == "__main__":
    main()
