"""Shared test helpers: fast Trainer settings and reading real TensorBoard event files back."""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def load_script(path: Path, name: str) -> ModuleType:
    """Import a script that is not part of the package (an example, ``scripts/...``) as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """Settings that keep a real Trainer run to a second or two on 2 CPU cores."""
    base: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "log_every_n_steps": 1,
    }
    base.update(overrides)
    return base


class ReleaseProcessGroup(pl.Callback):
    """Inside each ``ddp_spawn`` worker: destroy the gloo process group once fit is over.

    Lightning destroys the group at exit only for NCCL. A gloo group left alive into interpreter
    shutdown can abort the worker (SIGABRT, "terminate called without an active exception") while its
    C++ threads still hold tensors; PyTorch's advice is to call ``destroy_process_group`` at the end.
    Callback ``teardown`` runs after the strategy's own teardown, when no collective is left to issue.
    """

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def ddp_spawn_kwargs(callbacks: list[Any], **overrides: Any) -> dict[str, Any]:
    """Trainer settings for a real 2-process CPU DDP run (gloo, ``ddp_spawn``) that exits cleanly."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=60))
    return trainer_kwargs(callbacks=[*callbacks, ReleaseProcessGroup()], strategy=strategy, devices=2, **overrides)


def read_tb_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in the event files under ``logdir``: ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


@pytest.fixture
def tb_scalars():
    return read_tb_scalars
