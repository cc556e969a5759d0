"""How far the sampled update ratio is from the exact one (``update_ratio_sample``, docs/readings.md).

Two :class:`~lightning_health.pipeline.learning.UpdateTracker` read the same optimizer steps: one with
the default sample, one copying every value (the exact ratio, ``sample=None``). Every module's ratio
of every step is compared; the table gives the largest and the median relative error of the modules
that are sampled (the others are exact by construction).

Cases: the benchmark's MLP layer sizes (784-1024-1024-1024-10, dense updates) under SGD, SGD with
momentum, Adam and AdamW; an embedding of 50,000 x 256 with 512 tokens a step (1% of its rows move
under SGD; under Adam the rows seen so far keep moving).

    python -m benchmarks.update_sample            # about 1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Iterator

import torch
from torch import nn

from lightning_health.pipeline.learning import UpdateTracker

Batch = tuple[torch.Tensor, torch.Tensor]


class _Embedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50_000, 256)
        self.head = nn.Linear(256, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).mean(dim=1))


def _mlp() -> nn.Module:
    widths = (784, 1024, 1024, 1024)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(1024, 10))


def _batches(kind: str, generator: torch.Generator) -> Iterator[Batch]:
    while True:
        if kind == "mlp":
            inputs = torch.randn(256, 784, generator=generator).clamp(min=0)
            yield inputs, torch.randint(10, (256,), generator=generator)
        else:
            yield torch.randint(50_000, (8, 64), generator=generator), torch.randint(10, (8,), generator=generator)


CASES: dict[str, tuple[str, Callable[[], nn.Module], Callable[[list[nn.Parameter]], torch.optim.Optimizer]]] = {
    "MLP, SGD": ("mlp", _mlp, lambda p: torch.optim.SGD(p, lr=0.05)),
    "MLP, SGD with momentum": ("mlp", _mlp, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    "MLP, Adam": ("mlp", _mlp, lambda p: torch.optim.Adam(p, lr=1e-3)),
    "MLP, AdamW": ("mlp", _mlp, lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1)),
    "embedding, SGD": ("embedding", _Embedding, lambda p: torch.optim.SGD(p, lr=0.5)),
    "embedding, Adam": ("embedding", _Embedding, lambda p: torch.optim.Adam(p, lr=1e-3)),
}


def errors(case: str, steps: int = 20, sample: int = 65536, seed: int = 0) -> list[float]:
    """Relative errors of the sampled ratio against the exact one, per sampled module and step."""
    kind, make_model, make_optimizer = CASES[case]
    torch.manual_seed(seed)
    model = make_model()
    optimizer = make_optimizer(list(model.parameters()))
    groups = [(n, list(m.parameters(recurse=False))) for n, m in model.named_modules() if n]
    groups = [(n, ps) for n, ps in groups if ps]
    sampled = [k for k, (_n, ps) in enumerate(groups) if any(p.numel() > sample for p in ps)]
    estimate, exact = UpdateTracker(groups, None, sample), UpdateTracker(groups, None, None)
    batches = _batches(kind, torch.Generator().manual_seed(seed))
    out = []
    for _ in range(steps):
        inputs, labels = next(batches)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        estimate.before_step(optimizer)
        exact.before_step(optimizer)
        optimizer.step()
        got, _ = estimate.after_step()
        want, _ = exact.after_step()
        assert got is not None and want is not None
        n = len(groups)
        out += [abs(got[n + k].item() / want[n + k].item() - 1) for k in sampled]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.update_sample", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sample", type=int, default=65536)
    args = parser.parse_args(argv)
    print("| update | readings | largest relative error | median |\n|---|---:|---:|---:|")
    for case in CASES:
        found = errors(case, args.steps, args.sample)
        print(f"| {case} | {len(found)} | {max(found):.2%} | {statistics.median(found):.2%} |")


if __name__ == "__main__":
    main()
