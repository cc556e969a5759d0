"""Is each module learning? Parameter norms and the update-to-weight ratio, as pure tensor functions.

``update_ratio = ||W_after - W_before|| / ||W_before||`` over all of one module's parameters, for one
optimizer step. It is computed from the weights themselves (a snapshot before the step, the live
weights after it), so it is exact whatever the optimizer does: momentum, Adam, weight decay,
schedulers, clipping, a GradScaler that skips the step (the weights did not move: 0).

Example:
    >>> import torch
    >>> w = [torch.ones(3, 4), torch.ones(4)]
    >>> owners = torch.tensor([0, 0])
    >>> group_norms(w, owners, 1).round(decimals=4)
    tensor([4.], dtype=torch.float64)
    >>> update_ratio(torch.tensor([0.0, 1e-3, 2.0]), torch.tensor([0.0, 1.0, 0.0]))
    tensor([0.0000, 0.0010,    nan])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_health.readings.fused import row_squares

# A tensor at least this large is read as rows on a CPU (:func:`tensor_squares`).
_ROWS_FROM = 1 << 16


def tensor_squares(tensors: Sequence[Tensor]) -> Tensor:
    """The float64 sum of squares of each tensor, as one vector on their device.

    Half tensors are accumulated in float32 (a bfloat16 norm keeps 3 digits), float64 ones in
    float64. On a CPU a large tensor is read as rows
    (:func:`~lightning_health.readings.fused.row_squares`) whose norms are combined in float64: one
    ``vector_norm`` over a whole 16M-value tensor drifts by up to 1e-3 relative and is ~1.7x slower.
    Small tensors, and every tensor on an accelerator (one multi-tensor kernel), take one
    ``_foreach_norm``.
    """
    tensors = list(tensors)
    acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    rows = [t.device.type == "cpu" and t.numel() >= _ROWS_FROM for t in tensors]
    if not any(rows):
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=acc)).to(torch.float64).square_()
    out = torch.empty(len(tensors), dtype=torch.float64, device=tensors[0].device)
    small = [k for k, r in enumerate(rows) if not r]
    if small:
        norms = torch._foreach_norm([tensors[k] for k in small], 2, dtype=acc)
        out[small] = torch.stack(norms).to(torch.float64).square_()
    large = [k for k, r in enumerate(rows) if r]
    out[large] = torch.stack([row_squares(tensors[k]) for k in large])
    return out


def group_squares(tensors: Sequence[Tensor], owners: Tensor, groups: int, weights: Tensor | None = None) -> Tensor:
    """The sum of squares of each group's tensors: :func:`tensor_squares` and one segment sum.

    Args:
        tensors: the tensors, all on one device (plain tensors: a sharded parameter's local shard).
        owners: a long tensor on that device: the group index of each tensor.
        groups: how many groups (groups without a tensor read 0).
        weights: per tensor, the weight of its squares (a shard held by several ranks counts once in
            a sum over ranks, see :func:`lightning_health.pipeline.sync.replica_weight`).

    Returns:
        A float64 vector of ``groups`` sums.
    """
    out = torch.zeros(groups, dtype=torch.float64, device=owners.device)
    if not tensors:
        return out
    squares = tensor_squares(tensors)
    if weights is not None:
        squares = squares * weights
    return out.index_add_(0, owners, squares)


def group_norms(tensors: Sequence[Tensor], owners: Tensor, groups: int) -> Tensor:
    """The L2 norm of each group's tensors (see :func:`group_squares`), as a float64 vector."""
    return group_squares(tensors, owners, groups).sqrt_()


def snapshot(params: Sequence[Tensor]) -> list[Tensor]:
    """Exact copies of ``params`` in their own dtype and device (a lower precision would swamp small updates)."""
    return [p.detach().clone() for p in params]


def update_squares(
    before: list[Tensor], params: Sequence[Tensor], owners: Tensor, groups: int, weights: Tensor | None = None
) -> Tensor:
    """Per group, ``||W_after - W_before||^2``; ``before`` is overwritten with the difference (no second copy)."""
    if not before:
        return torch.zeros(groups, dtype=torch.float64, device=owners.device)
    torch._foreach_sub_(before, [p.detach() for p in params])
    return group_squares(before, owners, groups, weights)


def update_norms(before: list[Tensor], params: Sequence[Tensor], owners: Tensor, groups: int) -> Tensor:
    """Per group, ``||W_after - W_before||`` (see :func:`update_squares`)."""
    return update_squares(before, params, owners, groups).sqrt_()


def update_ratio(delta_norm: Tensor, weight_norm: Tensor) -> Tensor:
    """``delta / weight`` elementwise; 0 where nothing moved, NaN where the weights were all zero and moved.

    A module whose weights are all zero (a zero-initialised projection before its first step) has no
    scale to compare its update with: its ratio is undefined, not infinite, and no rule reads it.
    """
    ratio = torch.where(weight_norm > 0, delta_norm / weight_norm, torch.full_like(delta_norm, float("nan")))
    return torch.where(delta_norm == 0, torch.zeros_like(ratio), ratio)
