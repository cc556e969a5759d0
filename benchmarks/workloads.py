"""The three benchmark workloads of issue 5, as real LightningModules over seeded synthetic data.

* ``mlp``: MLP 784-1024x4-10 with ReLU, batch 256 (an MNIST-sized classifier).
* ``cnn``: four 3x3 convolutions with ReLU on 3x32x32 images, batch 128 (a CIFAR-sized classifier).
* ``lm``: a 4-layer, d=256 pre-norm causal transformer language model with ``nn.GELU`` MLPs,
  sequence 128, batch 16.

Every workload can also be built ``tiny`` (a few thousand parameters, a handful of examples) so the
smoke test exercises the same code paths in well under a second per fit.

Data lives in memory: a small pool of distinct batches generated once from a fixed seed and cycled,
so no step waits on I/O or random-number generation and every variant sees identical batches.

Example:
    >>> module, loader = make_workload("mlp", num_batches=3, tiny=True)
    >>> x, y = next(iter(loader))
    >>> tuple(x.shape), tuple(y.shape)
    ((8, 784), (8,))
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

WORKLOADS: tuple[str, ...] = ("mlp", "cnn", "lm")

_POOL_SIZE = 4  # distinct batches per workload; cycled for as many steps as asked


class CycledBatches(Dataset):
    """``length`` items drawn round-robin from a fixed pool of pre-built batches.

    Args:
        pool: Complete batches (tuples of tensors), already of the training batch size.
        length: How many batches one epoch yields.
    """

    def __init__(self, pool: list[tuple[Tensor, ...]], length: int) -> None:
        if length < 1:
            raise ValueError(f"Expected `length` to be a positive int, got {length}")
        self.pool = pool
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        return self.pool[index % len(self.pool)]


class _ClassifierModule(pl.LightningModule):
    """Cross-entropy classification over ``self.net``; shared by the MLP and the CNN."""

    net: nn.Module

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class MLP(_ClassifierModule):
    """784-1024x4-10 ReLU MLP (``width=1024``, ``depth=4``); ``tiny`` shrinks the hidden width."""

    def __init__(self, width: int = 1024, depth: int = 4, in_features: int = 784, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        fan_in = in_features
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.ReLU()]
            fan_in = width
        layers.append(nn.Linear(fan_in, classes))
        self.net = nn.Sequential(*layers)


class CNN(_ClassifierModule):
    """Four 3x3 convolutions with ReLU, two 2x2 max-pools, global average pool and a linear head."""

    def __init__(self, channels: tuple[int, int, int, int] = (16, 32, 64, 64), classes: int = 10) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c3, c4, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(c4, classes),
        )


class Block(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention, then a GELU MLP (4x width)."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"Expected `d_model` divisible by `heads`, got d_model={d_model}, heads={heads}")
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    @override
    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TransformerLM(pl.LightningModule):
    """Decoder-only language model: token + position embeddings, ``layers`` blocks, tied-free LM head."""

    def __init__(self, vocab: int = 512, d_model: int = 256, layers: int = 4, heads: int = 4, seq: int = 128) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(1, seq, d_model))
        self.blocks = nn.Sequential(*(Block(d_model, heads) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    @override
    def forward(self, tokens: Tensor) -> Tensor:
        x = self.tok(tokens) + self.pos[:, : tokens.shape[1]]
        return self.head(self.ln_f(self.blocks(x)))

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, targets = batch
        logits = self(tokens)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


def _mlp_batches(gen: torch.Generator, batch: int, in_features: int = 784, classes: int = 10) -> list:
    teacher = torch.randn(in_features, classes, generator=gen)
    pool = []
    for _ in range(_POOL_SIZE):
        x = torch.randn(batch, in_features, generator=gen)
        pool.append((x, (x @ teacher).argmax(dim=1)))
    return pool


def _cnn_batches(gen: torch.Generator, batch: int, size: int, classes: int = 10) -> list:
    return [
        (torch.randn(batch, 3, size, size, generator=gen), torch.randint(0, classes, (batch,), generator=gen))
        for _ in range(_POOL_SIZE)
    ]


def _lm_batches(gen: torch.Generator, batch: int, seq: int, vocab: int) -> list:
    pool = []
    for _ in range(_POOL_SIZE):
        # A learnable stream: each token is the previous one plus a small random step (mod vocab).
        steps = torch.randint(0, 3, (batch, seq + 1), generator=gen)
        stream = steps.cumsum(dim=1) % vocab
        pool.append((stream[:, :-1].contiguous(), stream[:, 1:].contiguous()))
    return pool


_Builder = Callable[[torch.Generator], tuple[pl.LightningModule, list]]

_FULL: dict[str, _Builder] = {
    "mlp": lambda g: (MLP(), _mlp_batches(g, batch=256)),
    "cnn": lambda g: (CNN(), _cnn_batches(g, batch=128, size=32)),
    "lm": lambda g: (TransformerLM(), _lm_batches(g, batch=16, seq=128, vocab=512)),
}
_TINY: dict[str, _Builder] = {
    "mlp": lambda g: (MLP(width=16, depth=2), _mlp_batches(g, batch=8)),
    "cnn": lambda g: (CNN(channels=(4, 4, 8, 8)), _cnn_batches(g, batch=4, size=8)),
    "lm": lambda g: (TransformerLM(vocab=32, d_model=16, layers=2, heads=2, seq=8), _lm_batches(g, 2, 8, 32)),
}


def make_workload(
    name: str, num_batches: int, *, tiny: bool = False, seed: int = 0
) -> tuple[pl.LightningModule, DataLoader]:
    """Build a workload's module and a loader yielding ``num_batches`` batches, both from ``seed``.

    Args:
        name: One of :data:`WORKLOADS`.
        num_batches: Length of the loader (one epoch); make it at least the number of steps to run.
        tiny: Build the reduced-size variant used by the smoke test.
        seed: Seeds both the parameter initialisation and the synthetic data.

    Returns:
        The LightningModule and a ``DataLoader`` of ready-made batches (``batch_size=None``).

    Raises:
        ValueError: If ``name`` is not a known workload.
    """
    builders = _TINY if tiny else _FULL
    if name not in builders:
        raise ValueError(f"Expected `name` to be one of {WORKLOADS}, got {name!r}")
    torch.manual_seed(seed)
    module, pool = builders[name](torch.Generator().manual_seed(seed))
    loader = DataLoader(CycledBatches(pool, num_batches), batch_size=None, shuffle=False, num_workers=0)
    return module, loader


def describe(name: str, *, tiny: bool = False) -> str:
    """One line naming the workload's architecture, size and batch, for the report."""
    module, loader = make_workload(name, 1, tiny=tiny)
    params = sum(p.numel() for p in module.parameters())
    shapes = " ".join("x".join(map(str, t.shape)) for t in next(iter(loader)))
    label = {
        "mlp": "MLP 784-1024x4-10 ReLU",
        "cnn": "CNN 4x conv3x3 (16-32-64-64) ReLU",
        "lm": "Transformer LM 4 layers d=256 GELU",
    }[name]
    if tiny:
        label = f"tiny {name} (smoke-test size)"
    return f"{label}, {params / 1e6:.2f}M params, batch {shapes}"


__all__ = ["CNN", "MLP", "WORKLOADS", "CycledBatches", "TransformerLM", "describe", "make_workload"]
