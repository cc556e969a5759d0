"""Cost of the transformer readings on the LM workload's shapes, against one plain training step.

The LM workload's blocks compute attention inline (no attention module to hook), so this times what
the hooks would do per sampled step, on its exact shapes (batch 16, 128 tokens, d=256, 4 heads,
4 layers): recomputing q/k from the block input, the chunked scores (:func:`attention_totals`) and
the massive-activation reading of each block output; then compares with a plain optimizer step.

    OMP_NUM_THREADS=1 python -m benchmarks.attention_cost
"""

from __future__ import annotations

import time

import torch

from benchmarks.workloads import make_workload
from lightning_health.readings.attention import attention_totals, massive_totals


def _best(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    torch.manual_seed(0)
    model, loader = make_workload("lm", 1)
    opt = model.configure_optimizers()
    batch = next(iter(loader))

    def plain_step() -> None:
        opt.zero_grad()
        model.training_step(batch, 0).backward()
        opt.step()

    plain_step()
    step = _best(plain_step)
    with torch.no_grad():
        x = torch.randn(16, 128, 256)
        blocks = list(model.blocks)

    def readings() -> None:
        with torch.no_grad():
            for block in blocks:
                qkv = block.qkv(block.ln1(x))
                q, k, _ = qkv.view(16, 128, 3, 4, 64).permute(2, 0, 3, 1, 4)
                attention_totals(q, k, 64**-0.5, causal=True)
                massive_totals(x)

    readings()
    cost = _best(readings)
    print(f"plain step {step * 1e3:.1f} ms; transformer readings {cost * 1e3:.1f} ms per sampled step")
    print(f"every step: +{100 * cost / step:.1f}%; every 50 steps (default): +{100 * cost / step / 50:.2f}%")


if __name__ == "__main__":
    main()
