"""DDP for real: 2 CPU processes (gloo) through Lightning's ``ddp_spawn``, readings read back from disk.

``ddp_spawn`` runs fit in two fresh processes; the callback object in this (the parent) process
never sees their state, so everything is checked from files: the CSV logger rank zero wrote, and
one JSON file per rank written by a small recorder callback that runs inside the workers.
Collectives get a 60 s timeout so a layout mismatch fails fast instead of hanging CI.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_health import HealthMonitor
from tests.conftest import ddp_spawn_kwargs

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"),
]

STEPS = 4
BATCH = 3
_COLLECTIVES = ("all_gather", "all_reduce", "all_gather_object", "all_gather_into_tensor", "broadcast", "reduce")


def rank_batch(rank: int, step: int, size: int = BATCH) -> torch.Tensor:
    """Rank 0's inputs light up unit 0 only, rank 1's unit 3 only; units 1 and 2 never fire anywhere."""
    g = torch.Generator().manual_seed(100 * rank + step)
    x = -torch.rand(size, 4, generator=g)  # negative: silent after an identity Linear + ReLU
    x[:, 0 if rank == 0 else 3] = torch.rand(size, generator=g) + (1.0 if rank == 0 else 5.0)
    return x


class RankModel(pl.LightningModule):
    """Identity Linear -> ReLU -> head, lr 0 so every step sees the same weights (an exact reference)."""

    def __init__(self, empty_on_rank0: bool = False) -> None:
        super().__init__()
        self.empty_on_rank0 = empty_on_rank0
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.side = nn.Tanh()  # with empty_on_rank0: a layer that only rank 1 ever calls
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.eye(4))
            self.lin.bias.zero_()
            self.head.weight.copy_(torch.arange(8.0).reshape(2, 4) / 8 - 0.3)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.lin(x)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        rank = self.global_rank
        size = 0 if (self.empty_on_rank0 and rank == 0) else BATCH
        out = self(rank_batch(rank, self.global_step, size))
        if self.empty_on_rank0 and rank == 1:
            out = out + self.side(out)
        # sum over rows (not mean): a zero-size batch still gives a well-defined loss of 0
        return out.square().sum() + 0.0 * sum(p.sum() for p in self.parameters())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class CallLogger(Logger):
    """A logger without rank-zero guards: it records which rank called ``log_metrics``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    @property
    def name(self) -> str:
        return "calls"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if any(k.startswith("health/") for k in metrics):
            with open(self.path, "a") as f:
                f.write(f"{os.environ.get('LOCAL_RANK', '?')} {dist.get_rank()} {step}\n")


class CollectiveRecorder(pl.Callback):
    """Inside each worker: count collectives issued from lightning_health per training step."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.counts: dict[str, int] = {}
        self.step: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        import lightning_health

        package = str(Path(lightning_health.__file__).parent)
        recorder = self
        for name in _COLLECTIVES:
            original = getattr(dist, name)

            def counting(*args: Any, __original: Any = original, __name: str = name, **kwargs: Any) -> Any:
                import sys

                if sys._getframe(1).f_code.co_filename.startswith(package):
                    key = f"{__name}@{recorder.step}"
                    recorder.counts[key] = recorder.counts.get(key, 0) + 1
                return __original(*args, **kwargs)

            setattr(dist, name, counting)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.step = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        path = Path(self.out_dir) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"counts": self.counts, "curves": _monitor_curves(trainer)}))


def _monitor_curves(trainer: pl.Trainer) -> dict[str, Any]:
    monitor = next(c for c in trainer.callbacks if isinstance(c, HealthMonitor))
    return {m: monitor.curves(m) for m in ("act_mean", "dead_fraction", "grad_norm", "act_max")}


def _fit(tmp_path: Path, model: RankModel) -> tuple[dict[int, dict[str, Any]], list[dict[str, str]], list[str]]:
    data = DataLoader(TensorDataset(torch.zeros(2 * STEPS, 1)), batch_size=1)
    monitor = HealthMonitor(every_n_steps=1, dead_window=1, log_histograms=False, verbose=False)
    csv_logger = CSVLogger(tmp_path, name="csv", version=0)
    calls = tmp_path / "calls.txt"
    trainer = pl.Trainer(
        **ddp_spawn_kwargs(
            [monitor, CollectiveRecorder(str(tmp_path))],
            max_steps=STEPS,
            logger=[csv_logger, CallLogger(str(calls))],
        ),
    )
    trainer.fit(model, data)
    ranks = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return ranks, rows, calls.read_text().splitlines()


def _reference(step: int, empty_on_rank0: bool = False) -> dict[str, float]:
    """The readings of the global batch (both ranks' examples) computed with plain torch."""
    model = RankModel()
    acts, grads = [], []
    for rank in (0, 1):
        a = model.act(model.lin(rank_batch(rank, step, 0 if (empty_on_rank0 and rank == 0) else BATCH)))
        a.retain_grad()
        out = model.head(a)
        if empty_on_rank0 and rank == 1:
            out = out + model.side(out)
        out.square().sum().backward()
        acts.append(a.detach())
        grads.append(a.grad)
    act, grad = torch.cat(acts), torch.cat(grads)
    return {
        "act_mean": act.mean().item(),
        "act_max": act.max().item(),
        "dead_fraction": (~(act > 0).any(0)).float().mean().item(),
        "grad_norm": grad.norm().item(),
    }


def test_readings_reflect_the_global_batch_with_one_collective_per_sampled_step(tmp_path):
    ranks, rows, calls = _fit(tmp_path, RankModel())
    # Unit 3 fires only on rank 1's data: it is alive in rank 0's report (dead = units 1, 2).
    assert _reference(0)["dead_fraction"] == 0.5
    for rank in (0, 1):  # every rank holds the same synced readings
        for metric in ("act_mean", "act_max", "dead_fraction", "grad_norm"):
            curve = dict((s, v) for s, v in ranks[rank]["curves"][metric]["act"])
            assert sorted(curve) == list(range(STEPS)), (rank, metric)
            for step, value in curve.items():
                assert value == pytest.approx(_reference(step)[metric], rel=1e-6), (rank, metric, step)
    # The CSV file rank zero wrote holds the same global readings at the sampled steps.
    logged = {int(r["step"]): float(r["health/dead_fraction/act"]) for r in rows if r.get("health/dead_fraction/act")}
    assert logged == dict.fromkeys(range(STEPS), 0.5)
    # Only rank zero called a logger, once per sampled step.
    assert sorted(calls) == sorted(f"0 0 {s}" for s in range(STEPS))
    # Two fixed-size all-reduces (sum, max) per sampled step in steady state; the first step also agrees on the layout.
    for rank in (0, 1):
        counts = ranks[rank]["counts"]
        for step in range(1, STEPS):
            assert {k: v for k, v in counts.items() if k.endswith(f"@{step}")} == {f"all_reduce@{step}": 2}, counts


def test_a_rank_with_an_empty_batch_does_not_break_the_collective(tmp_path):
    ranks, _rows, _calls = _fit(tmp_path, RankModel(empty_on_rank0=True))
    for rank in (0, 1):
        curves = ranks[rank]["curves"]
        for metric in ("act_mean", "act_max", "dead_fraction", "grad_norm"):
            curve = dict((s, v) for s, v in curves[metric]["act"])
            assert sorted(curve) == list(range(STEPS)), (rank, metric)
            for step, value in curve.items():
                ref = _reference(step, empty_on_rank0=True)[metric]
                assert value == pytest.approx(ref, rel=1e-6), (rank, metric, step)
    # only rank 1's unit 3 ever fired
    assert all(math.isclose(v, 0.75) for _s, v in ranks[0]["curves"]["dead_fraction"]["act"])
    # `side` runs on rank 1 only: rank 0 never learns its width, yet the layouts agree
    side = dict((s, v) for s, v in ranks[0]["curves"]["act_max"]["side"])
    assert sorted(side) == list(range(STEPS))


def _gpt2_batch(rank: int, step: int) -> torch.Tensor:
    return torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(100 * step + rank))


class RankGPT2(pl.LightningModule):
    """A tiny GPT-2 without dropout at lr 0; rank r reads :func:`_gpt2_batch` ``(r, step)``."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
        self.model = transformers.GPT2LMHeadModel(config)
        with torch.no_grad():  # larger weights than the init, so the two ranks' batches read apart
            for p in self.model.parameters():
                p.mul_(3.0)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids = _gpt2_batch(self.global_rank, self.global_step)
        return self.model(ids, labels=ids).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class EntropyRecorder(pl.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        monitor = next(c for c in trainer.callbacks if isinstance(c, HealthMonitor))
        curves = {m: monitor.curves(m) for m in ("attn_entropy", "attn_logit_max")}
        (Path(self.out_dir) / f"attn{trainer.global_rank}.json").write_text(json.dumps(curves))


def test_attention_entropy_is_the_global_batchs_whatever_the_number_of_ranks(tmp_path):
    """Entropy sums and row counts add across ranks: the reading equals one process's on both ranks' examples
    (it was the per-head lowest rank mean, which drifts down as ranks are added)."""
    pytest.importorskip("transformers")
    monitor = HealthMonitor(every_n_steps=1, log_histograms=False, verbose=False, heatmap_every_n_samples=None)
    data = DataLoader(TensorDataset(torch.zeros(2 * 2, 1)), batch_size=1)
    trainer = pl.Trainer(**ddp_spawn_kwargs([monitor, EntropyRecorder(str(tmp_path))], max_steps=2))
    trainer.fit(RankGPT2(), data)
    reference = RankGPT2().model
    reference.config._attn_implementation = "eager"
    for rank in (0, 1):
        got = json.loads((tmp_path / f"attn{rank}.json").read_text())
        for step in (0, 1):
            with torch.no_grad():
                out = reference(torch.cat([_gpt2_batch(r, step) for r in (0, 1)]), output_attentions=True)
            for layer, probs in enumerate(out.attentions):
                name = f"model.transformer.h.{layer}.attn"
                entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
                assert dict(got["attn_entropy"][name])[step] == pytest.approx(entropy.mean().item(), rel=1e-5)
