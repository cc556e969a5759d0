"""The GPU check of issue 14: blocking syncs per step, step-time ratios and findings, on one CUDA device.

One prepared run (a GPU lease is minutes long), every section guarded so one failure keeps the rest:

* ``exact``: the device reductions (branch-free path) against NumPy on CUDA tensors in float32,
  bfloat16 and float16 holding zeros, NaN and Inf: counts, min and max exact, moments within 1e-5.
* ``syncs``: a fit with ``HealthMonitor(every_n_steps=50)`` and one without, under
  ``torch.cuda.set_sync_debug_mode("warn")``: the synchronizing CUDA calls of every step, split into
  unsampled and sampled steps, and the monitor's own (a ``lightning_health`` frame on the stack) by
  source line; ``torch.profiler`` counts the CUDA runtime's synchronize calls on a few steps too.
* ``timing``: interleaved fits without a monitor and with ``every_n_steps=50`` and ``=1``, the
  timed steps bracketed by ``torch.cuda.synchronize()``: seconds per step, their ratios within a
  round, and peak device memory; on a GPT-2-small-sized model (124M parameters, ``bf16-mixed``)
  and the benchmark's CNN (float32).
* ``findings``: what the monitor concludes on the healthy GPT-2 and CNN fits, and on a CNN whose
  weights turn NaN mid-run.

Run: ``python -m benchmarks.gpu_check --out gpu.json`` (``--small``: tiny sizes, for a smoke run on a
CPU). Writes the JSON after every section and prints a summary.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from benchmarks.workloads import CNN, CycledBatches, _cnn_batches, _lm_batches

_SYNC_TEXT = "synchronizing CUDA operation"
_PROFILED_CALLS = (
    "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaLaunchKernel",
)  # fmt: skip
"""CUDA runtime calls counted per profiled step: the synchronising ones, copies, and kernel launches."""


class GPT2(pl.LightningModule):
    """A Hugging Face GPT-2 language model from its config, random weights, next-token loss."""

    def __init__(self, small: bool) -> None:
        super().__init__()
        import transformers

        config = (
            transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=512)
            if small
            else transformers.GPT2Config()
        )
        self.model = transformers.GPT2LMHeadModel(config)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        ids, targets = batch
        logits = self.model(input_ids=ids).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


class CNNModule(CNN):
    """The benchmark's CNN with an optional NaN planted in its first weight at ``poison_at``."""

    def __init__(self, poison_at: int = -1) -> None:
        super().__init__()
        self.poison_at = poison_at

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step == self.poison_at:
            with torch.no_grad():
                self.net[0].weight[0, 0, 0, 0] = math.nan


def workload(name: str, small: bool, steps: int, poison_at: int = -1) -> tuple[pl.LightningModule, Any, str]:
    """(module, loader, precision) of ``gpt2`` or ``cnn``."""
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if name == "gpt2":
        module: pl.LightningModule = GPT2(small)
        vocab = module.model.config.vocab_size
        pool = _lm_batches(gen, batch=2 if small else 8, seq=32 if small else 1024, vocab=vocab)
        precision = "bf16-mixed"
    else:
        module, precision = CNNModule(poison_at), "32-true"
        pool = _cnn_batches(gen, batch=4 if small else 128, size=8 if small else 32)
    return module, DataLoader(CycledBatches(pool, steps), batch_size=None), precision


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fit(name: str, every: int, steps: int, small: bool, callbacks: list[Callback], poison_at: int = -1) -> Any:
    """One real ``Trainer.fit`` of ``steps`` steps; returns the HealthMonitor (or None)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_health import HealthMonitor

    module, loader, precision = workload(name, small, steps, poison_at)
    monitor = HealthMonitor(every_n_steps=every, verbose=False) if every else None
    with tempfile.TemporaryDirectory() as workdir:
        trainer = pl.Trainer(
            accelerator="auto", devices=1, precision=precision, max_steps=steps, logger=TensorBoardLogger(workdir),
            callbacks=[*callbacks, *([monitor] if monitor else [])], enable_progress_bar=False,
            enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        )  # fmt: skip
        trainer.fit(module, loader)
        _sync()
    return monitor


# ----------------------------------------------------------------------------------------------- exact


def check_exact(device: str, small: bool = False) -> dict[str, Any]:
    """Device-path totals of awkward tensors against NumPy: mismatches listed, empty when exact."""
    import numpy as np

    from lightning_health.readings import reductions as R

    problems, checked = [], 0
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        sizes = (1000, 1 << 20, R.CHUNK + 12345) + (() if small else (R.ACCELERATOR_CHUNK + 12345,))
        for n in sizes:  # the last ones straddle a chunk boundary (a CPU's, an accelerator's)
            x = torch.randn(n, generator=gen).relu()
            x[:7] = torch.tensor([0.0, -0.0, math.nan, math.inf, -math.inf, 1e-40, -3.0])
            x = x.to(dtype)
            ref = x.float().numpy().astype(np.float64)
            t = R.activation_totals(x.to(device), bounds=(0.0, 1.0)).tolist()
            g = R.gradient_totals(x.to(device)).tolist()
            nonfinite = float((~np.isfinite(ref)).sum())
            want = {"count": float(n), "zeros": float((ref == 0).sum()), "nonfinite": nonfinite}
            got = {"count": t[R.A_COUNT], "zeros": t[R.A_ZEROS], "nonfinite": t[R.A_NONFINITE]}
            problems += [f"{dtype} n={n} {k}: {got[k]} != {want[k]}" for k in want if got[k] != want[k]]
            if g[R.G_NONFINITE] != nonfinite:
                problems.append(f"{dtype} n={n} gradient nonfinite: {g[R.G_NONFINITE]} != {nonfinite}")
            if not math.isnan(t[R.A_SUM]):
                problems.append(f"{dtype} n={n}: the sum of a tensor holding NaN reads {t[R.A_SUM]}")
            clean32 = x[7:].float()
            tc = R.activation_totals(clean32.to(dtype).to(device), bounds=(0.0, 1.0)).tolist()
            c = clean32.numpy()
            cref = c.astype(np.float64)
            for key, idx, value in (("sum", R.A_SUM, cref.sum()), ("sumsq", R.A_SUMSQ, np.square(cref).sum())):
                if abs(tc[idx] - value) > 1e-5 * abs(value):
                    problems.append(f"{dtype} n={n} {key}: {tc[idx]} vs {value} (rel {abs(tc[idx] / value - 1):.1e})")
            if tc[R.A_MIN] != cref.min() or tc[R.A_MAX] != cref.max():
                problems.append(f"{dtype} n={n} min/max: {tc[R.A_MIN]}, {tc[R.A_MAX]} vs {cref.min()}, {cref.max()}")
            saturated = float((np.abs(c - np.float32(0.5)) >= np.float32(0.49)).sum())
            if tc[R.A_SATURATED] != saturated:
                problems.append(f"{dtype} n={n} saturated: {tc[R.A_SATURATED]} != {saturated}")
            checked += 1
            edges = R.symlog_edges(64, 1e-6, 1e3)
            counts = R.histogram_counts(x.to(device), edges.to(device)).tolist()
            e = edges.numpy().astype(np.float64)
            fin = x.float().numpy()[np.isfinite(x.float().numpy())].astype(np.float64)
            inside, _ = np.histogram(fin[(fin >= e[0]) & (fin <= e[-1])], bins=e)
            want_h = [float((fin < e[0]).sum()), *map(float, inside), float((fin > e[-1]).sum()), nonfinite]
            if counts != want_h:
                problems.append(f"{dtype} n={n} histogram counts differ from NumPy's")
    return {"cases": checked, "problems": problems}


# ----------------------------------------------------------------------------------------------- syncs


class SyncCounter(Callback):
    """Per-step synchronizing CUDA calls (sync debug mode warnings) and who made them."""

    def __init__(self, profile_steps: tuple[int, ...] = ()) -> None:
        self.per_step: dict[int, list[str | None]] = {}
        self.step = -1
        self.profile_steps = profile_steps
        self.profiled: dict[int, dict[str, int]] = {}
        self._prof: Any = None
        self._prof_step = -1

    def record(self, message: Any, *args: Any, **kwargs: Any) -> None:
        if _SYNC_TEXT not in str(message):
            return
        import traceback as tb

        ours = [f for f in tb.extract_stack() if f"{os.sep}lightning_health{os.sep}" in f.filename]
        where = (
            f"{ours[-1].filename.split('lightning_health' + os.sep)[-1]}:{ours[-1].lineno} {ours[-1].name}"
            if ours
            else None
        )
        self.per_step.setdefault(self.step, []).append(where)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._prof is not None:
            self.step = -2  # the profiler's own synchronisation on stopping is nobody's step
            self._prof.__exit__(None, None, None)
            counts = Counter()
            for ev in self._prof.key_averages():
                if any(ev.key.startswith(name) for name in _PROFILED_CALLS):
                    counts[ev.key] += ev.count
            self.profiled[self._prof_step] = dict(counts)
            self._prof = None
        self.step = trainer.global_step
        self.per_step.setdefault(self.step, [])
        if self.step in self.profile_steps and torch.cuda.is_available():
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self._prof = torch.profiler.profile(activities=acts)
            self._prof.__enter__()
            self._prof_step = self.step


def count_syncs(name: str, small: bool, every: int, steps: int) -> dict[str, Any]:
    """Synchronizing calls per step of one fit; sampled steps are those with ``step % every == 0``."""
    counter = SyncCounter(profile_steps=(steps // 2 - 3, steps // 2 - 2, steps // 2 - 1))
    original = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = counter.record  # type: ignore[assignment]
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")
        try:
            fit(name, every, steps, small, [counter])
        finally:
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = original
    steps_seen = sorted(s for s in counter.per_step if 0 <= s < steps)
    sampled = [s for s in steps_seen if every and s % every == 0]
    last = steps_seen[-1] if steps_seen else -1  # the fit ends in it: Lightning and the monitor tidy up
    plain = [s for s in steps_seen if s not in sampled and 2 < s < last]  # after the first steps' one-off set-up
    after = [s + 1 for s in sampled if s + 1 in counter.per_step]  # where a deferred copy lands

    def summary(group: list[int]) -> dict[str, Any]:
        if not group:
            return {}
        totals = [len(counter.per_step[s]) for s in group]
        ours = [sum(w is not None for w in counter.per_step[s]) for s in group]
        return {
            "steps": len(group),
            "syncs_per_step_max": max(totals),
            "syncs_per_step_median": statistics.median(totals),
            "monitor_syncs_per_step_max": max(ours),
            "monitor_syncs_per_step_median": statistics.median(ours),
        }

    sources = Counter(w for s in steps_seen if 0 < s < last for w in counter.per_step[s] if w is not None)
    return {
        "every_n_steps": every,
        "unsampled": summary(plain),
        "sampled": summary([s for s in sampled if s > 0]),
        "step_after_sampled": summary([s for s in after if s not in sampled]),
        "first_step": summary([0]),
        "last_step_and_end_of_fit": summary([last]),
        "monitor_sources": dict(sources.most_common(40)),
        "profiled_runtime_calls": {str(k): v for k, v in counter.profiled.items()},
    }


# ----------------------------------------------------------------------------------------------- timing


class Stopwatch(Callback):
    """Device-synchronised wall time of the steps ``[start, start + steps)``."""

    def __init__(self, start: int, steps: int) -> None:
        self.start, self.stop = start, start + steps
        self.t0 = self.seconds = math.nan

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.start:
            _sync()
            self.t0 = time.perf_counter()
        elif trainer.global_step == self.stop:
            _sync()
            self.seconds = time.perf_counter() - self.t0


def timing(name: str, small: bool, rounds: int, warmup: int, steps: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Interleaved rounds of none / every 50 / every step; the ratios are within a round."""
    variants = (0, 50, 1)
    per: dict[int, list[float]] = {v: [] for v in variants}
    peak: dict[int, list[float]] = {v: [] for v in variants}
    sampled: dict[int, list[int]] = {v: [] for v in variants}
    for r in range(rounds):
        order = variants[r % 3 :] + variants[: r % 3]
        for every in order:
            watch = Stopwatch(warmup, steps)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            monitor = fit(name, every, warmup + steps + 1, small, [watch])
            per[every].append(watch.seconds / steps)
            read = {step for curve in monitor.curves("act_mean").values() for step, _ in curve} if monitor else set()
            sampled[every].append(sum(warmup <= step < warmup + steps for step in read))  # bursts included
            if torch.cuda.is_available():
                peak[every].append(torch.cuda.max_memory_allocated() / 2**20)
            log(f"  {name} round {r} every={every}: {1000 * watch.seconds / steps:.2f} ms/step")
    ratios = {str(v): [per[v][r] / per[0][r] for r in range(rounds)] for v in (50, 1)}
    extra = {  # what one sampled step adds, from the round's difference to no monitor
        str(v): [1000 * (per[v][r] - per[0][r]) * steps / max(1, sampled[v][r]) for r in range(rounds)] for v in (50, 1)
    }
    return {
        "ms_per_step": {str(v): [1000 * t for t in per[v]] for v in variants},
        "ratio": ratios,
        "ratio_median": {v: statistics.median(rs) for v, rs in ratios.items()},
        "peak_mib": {str(v): peak[v] for v in variants},
        "sampled_steps_timed": {str(v): sampled[v] for v in (50, 1)},
        "ms_per_sampled_step_extra": extra,
        "warmup": warmup,
        "steps": steps,
    }


# ----------------------------------------------------------------------------------------------- findings


def findings(name: str, small: bool, every: int, steps: int, poison_at: int = -1) -> list[str]:
    """The monitor's findings after one fit, as their one-line text."""
    monitor = fit(name, every, steps, small, [], poison_at)
    return [str(f) for f in monitor.diagnose()]


def _record_monitor_warnings() -> Counter[str]:
    """Every other warning stays silent; the monitor's own are counted into the result, so a reading
    skipped on the device (e.g. attention under ``bf16-mixed``) cannot pass unseen."""
    seen: Counter[str] = Counter()
    warnings.filterwarnings("always", message="(HealthMonitor|lightning_health)")

    def record(message: Warning | str, category: type[Warning], *_args: Any, **_kwargs: Any) -> None:
        seen[f"{category.__name__}: {str(message)[:300]}"] += 1

    warnings.showwarning = record
    return seen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--small", action="store_true", help="tiny models and few steps (a smoke run, CPU is fine)")
    parser.add_argument("--sections", default="exact,syncs,timing,findings")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sync-every", default="0,50", help="the cadences whose syncs are counted (0: no monitor)")
    args = parser.parse_args(argv)
    import logging

    for logger in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    monitor_warnings = _record_monitor_warnings()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "lightning": pl.__version__,
    }
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {text}", flush=True)

    def save() -> None:
        result["monitor_warnings"] = dict(monitor_warnings)
        with open(args.out, "w") as out:
            json.dump(result, out, indent=1, default=str)

    s, every = (10, 5) if args.small else (1, 50)
    sizes = {"gpt2": (10, 100), "cnn": (20, 200)}  # warm-up and timed steps: 2 and 4 sampled at every 50
    jobs: dict[str, list[tuple[str, Callable[[], Any]]]] = {
        "exact": [("exact", lambda: check_exact(device, args.small))],
        "syncs": [
            (f"syncs/{w}/{e}", (lambda w=w, e=e: count_syncs(w, args.small, e, 2 * every + 4)))
            for w in ("cnn", "gpt2")
            for e in map(int, args.sync_every.split(","))
        ],
        "timing": [
            (
                f"timing/{w}",
                (lambda w=w: timing(w, args.small, args.rounds, sizes[w][0] // s or 2, sizes[w][1] // s, log)),
            )
            for w in ("cnn", "gpt2")
        ],
        "findings": [
            ("findings/cnn-nan@10", lambda: findings("cnn", args.small, 10, 120 // s, poison_at=60 // s)),
            ("findings/gpt2@10", lambda: findings("gpt2", args.small, 10, 200 // s)),
            ("findings/cnn@1", lambda: findings("cnn", args.small, 1, 300 // s)),
        ],
    }
    for section in args.sections.split(","):
        for key, job in jobs[section]:
            log(f"{key} ...")
            try:
                result[key] = job()
            except Exception:  # keep every other section's result
                result[key] = {"error": traceback.format_exc()}
            log(f"{key}: {json.dumps(result[key], default=str)[:1500]}")
            save()
    log("done")


if __name__ == "__main__":
    main(sys.argv[1:])
