"""A model no one here wrote: a randomly initialised tiny GPT-2 from transformers (built from a config, no download)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_health import HealthMonitor
from tests.conftest import trainer_kwargs

transformers = pytest.importorskip("transformers")


class TinyGPT2(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
        self.model = transformers.GPT2LMHeadModel(config)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_tiny_gpt2_gelu_activations_are_selected_and_read():
    ids = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(ids), batch_size=4)
    model = TinyGPT2()
    monitor = HealthMonitor(every_n_steps=2, dead_window=2, verbose=False)
    pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_steps=4, limit_val_batches=0)).fit(model, loader)
    gelus = [n for n, m in model.named_modules() if type(m).__name__ == "NewGELUActivation"]
    assert len(gelus) == 2  # one per transformer block, a transformers class (not torch.nn.GELU)
    for metric in ("act_mean", "act_std", "grad_norm", "zero_fraction"):
        curves = monitor.curves(metric)
        assert set(curves) == set(gelus), metric
        for layer in gelus:
            assert [s for s, _ in curves[layer]] == [0, 2]
            assert all(torch.isfinite(torch.tensor(v)) for _, v in curves[layer])
    # units are the 4 * n_embd = 128 features of the MLP's last axis, over (batch, seq)
    assert set(monitor.curves("dead_fraction")) == set(gelus)
    assert not [f for f in monitor.diagnose() if f.kind == "nonfinite"]
