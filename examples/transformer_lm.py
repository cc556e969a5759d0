"""A small character-level transformer language model watched by HealthMonitor.

Each block's MLP is ``Linear -> GELU -> Linear``; the monitor picks the GELU modules by default
(``blocks.0.mlp.act``, ...), so you see how much of each MLP sits on GELU's flat negative side and
how the gradients reaching each block compare.

The text is the docstrings of a few standard-library modules, so nothing is downloaded.

Run (about a minute on a laptop CPU)::

    python examples/transformer_lm.py --logger tensorboard --out runs
    tensorboard --logdir runs

    WANDB_MODE=offline python examples/transformer_lm.py --logger wandb --out runs
    # then `wandb sync runs/wandb/offline-run-*` if you want it online

Reduced settings for a smoke test: ``--max-steps 20 --d-model 32 --layers 1``.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_health import HealthMonitor


def corpus() -> str:
    """Some English technical prose that ships with Python."""
    import argparse as argparse_module
    import json
    import logging
    import textwrap

    documented = (json, logging, argparse_module, textwrap, json.dumps, json.loads, logging.Logger)
    parts = [inspect.getdoc(obj) or "" for obj in (*documented, argparse_module.ArgumentParser)]
    return "\n\n".join(part for part in parts if part)


class CharWindows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Every ``context``-long window of the text, with the next character as the target at each position."""

    def __init__(self, text: str, context: int) -> None:
        self.vocab = sorted(set(text))
        index = {char: i for i, char in enumerate(self.vocab)}
        self.tokens = torch.tensor([index[char] for char in text], dtype=torch.long)
        self.context = context

    def __len__(self) -> int:
        return len(self.tokens) - self.context - 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.tokens[i : i + self.context + 1]
        return chunk[:-1], chunk[1:]


class Block(nn.Module):
    """A pre-norm transformer block with causal self-attention and a GELU MLP."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc", nn.Linear(d_model, 4 * d_model))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("proj", nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyLM(L.LightningModule):
    """A character-level GPT-style model."""

    def __init__(self, vocab: int, context: int, d_model: int, heads: int, layers: int, lr: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.zeros(context, d_model))
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("mask", torch.triu(torch.ones(context, context, dtype=torch.bool), 1), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        x = self.embed(tokens) + self.position[:length]
        for block in self.blocks:
            x = block(x, self.mask[:length, :length])
        return self.head(self.norm(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, targets = batch
        logits = self(tokens)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"])


def make_logger(kind: str, out: Path) -> Logger:
    """A TensorBoard logger, or W&B (offline unless ``WANDB_MODE`` says otherwise)."""
    if kind == "tensorboard":
        return TensorBoardLogger(str(out), name="transformer_lm")
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        return WandbLogger(project="lightning_health-examples", name="transformer_lm", save_dir=str(out))
    raise ValueError(f"Expected `--logger` to be 'tensorboard' or 'wandb', got {kind!r}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--logger", choices=("tensorboard", "wandb"), default="tensorboard")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="where the logs go (default ./runs)")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--every-n-steps", type=int, default=25, help="HealthMonitor sampling interval")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    data = CharWindows(corpus(), args.context)
    model = TinyLM(len(data.vocab), args.context, args.d_model, args.heads, args.layers, args.lr)
    monitor = HealthMonitor(every_n_steps=args.every_n_steps)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.max_steps,
        logger=make_logger(args.logger, args.out),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.no_progress,
        log_every_n_steps=max(1, args.every_n_steps),
    )
    trainer.fit(model, DataLoader(data, batch_size=args.batch_size, shuffle=True))
    loss = trainer.callback_metrics.get("train_loss")
    if loss is not None:
        print(f"final train loss {float(loss):.3f} (a uniform guess scores {math.log(len(data.vocab)):.3f})")
    findings = monitor.diagnose()
    print(f"{len(findings)} finding(s)" + "".join(f"\n- {finding.message}" for finding in findings))
    if args.logger == "tensorboard":
        print(f"open the dashboards: tensorboard --logdir {args.out} --samples_per_plugin=scalars=100000,images=10000")
    else:
        import wandb

        run_dir = Path(trainer.logger.experiment.dir).parent  # .../wandb/offline-run-<time>-<id>
        wandb.finish()  # flush and close the run cleanly (its debug log then ends without a traceback)
        print(
            f"W&B run written to {run_dir}"
            + (f"; upload it with: wandb sync {run_dir}" if "offline" in run_dir.name else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
