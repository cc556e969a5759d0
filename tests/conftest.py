"""Shared test helpers: fast Trainer settings and reading real TensorBoard event files back."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


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
