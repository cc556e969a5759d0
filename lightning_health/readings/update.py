"""Is each module learning? Parameter norms and the update-to-weight ratio, as pure tensor functions.

``update_ratio = ||W_after - W_before|| / ||W_before||`` over all of one module's parameters, for one
optimizer step. It is computed from the weights themselves (a snapshot before the step, the live
weights after it), so it holds whatever the optimizer does: momentum, Adam, weight decay,
schedulers, clipping, a GradScaler that skips the step (the weights did not move: 0).

A parameter larger than the sample is snapshotted on a stratified random sample of blocks of
:data:`BLOCK` values, plus its tail (:class:`Strata`), and its ``||W_after - W_before||^2`` is the
drawn blocks' scaled up: unbiased, and the copy is a few hundred KiB instead of the weights.
``||W_before||`` is always read whole.

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

import dataclasses
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


BLOCK = 16
"""Contiguous values per sampled block (64 bytes in float32, a cache line): small enough that a sample
of 4,096 blocks is 4,096 nearly independent draws, where rows of a weight matrix differ in scale."""


@dataclasses.dataclass(frozen=True)
class Strata:
    """How a parameter of ``n`` values is sampled: its whole blocks cut into ``drawn`` runs of
    consecutive blocks, one block drawn uniformly from each. The first ``wide`` runs hold ``size + 1``
    blocks, the others ``size``; the values after the last whole block (the tail) are copied whole.

    One block per run is a stratified sample: it covers the tensor evenly (every row of a weight
    matrix, when there are fewer rows than runs), and the squares of the blocks drawn from runs of
    ``k`` blocks, times ``k``, plus the tail's, are an unbiased ``||W||^2``.

    Example:
        >>> s = Strata.of(10 * BLOCK + 3, 4 * BLOCK)
        >>> (s.drawn, s.size, s.wide, s.numel, s.weights)
        (4, 2, 2, 67, [3.0, 2.0, 1.0])
    """

    n: int
    drawn: int
    size: int
    wide: int

    @classmethod
    def of(cls, n: int, sample: int | None) -> Strata | None:
        """The strata of an ``n``-value parameter for a sample of ``sample`` values; ``None``: copied whole."""
        if sample is None or n <= sample:
            return None
        drawn = max(sample // BLOCK, 1)
        size, wide = divmod(n // BLOCK, drawn)
        return cls(n, drawn, size, wide)

    @property
    def numel(self) -> int:
        """Values copied: the drawn blocks and the tail."""
        return self.drawn * BLOCK + self.n % BLOCK

    @property
    def weights(self) -> list[float]:
        """The factor of each piece's squares (see :func:`pieces`): wide runs, narrow runs, tail."""
        runs = [(self.size + 1.0, self.wide), (float(self.size), self.drawn - self.wide), (1.0, self.n % BLOCK)]
        return [weight for weight, count in runs if count]


def sampled_numel(n: int, sample: int | None) -> int:
    """How many values of an ``n``-value parameter a snapshot copies (see :class:`Strata`).

    Example:
        >>> sampled_numel(1000, None), sampled_numel(1000, 4096), sampled_numel(10**6 + 3, 4096)
        (1000, 1000, 4099)
    """
    strata = Strata.of(n, sample)
    return n if strata is None else strata.numel


def draw_blocks(size: Tensor, wide: Tensor, drawn: int, generator: torch.Generator | None) -> Tensor:
    """One block index per run of each of ``P`` sampled parameters: ``(P, drawn)`` long, on their device.

    ``size`` and ``wide`` are the parameters' :attr:`Strata.size` and :attr:`Strata.wide`, as ``(P, 1)``
    float64 tensors; run ``j`` starts at block ``j * size + min(j, wide)`` and holds ``size + (j < wide)``
    blocks, so only those ``2 P`` numbers are kept between steps. The draw uses a generator of the
    monitor's own: the user's random streams are not touched, and on a GPU nothing waits for the host.
    No pass over the parameters: the cost is in the sample's size.

    Example:
        >>> s = Strata.of(10 * BLOCK + 3, 4 * BLOCK)  # runs of 3, 3, 2, 2 blocks
        >>> size, wide = torch.tensor([[2.0]], dtype=torch.float64), torch.tensor([[2.0]], dtype=torch.float64)
        >>> blocks = draw_blocks(size, wide, s.drawn, torch.Generator().manual_seed(0))[0].tolist()
        >>> [lo <= b < hi for b, (lo, hi) in zip(blocks, [(0, 3), (3, 6), (6, 8), (8, 10)])]
        [True, True, True, True]
    """
    j = torch.arange(drawn, dtype=size.dtype, device=size.device)
    starts = torch.minimum(j, wide).addcmul_(j, size)  # (P, drawn)
    sizes = (j < wide).to(size.dtype).add_(size)
    u = torch.rand(sizes.shape, dtype=size.dtype, device=size.device, generator=generator)
    return u.mul_(sizes).floor_().add_(starts).long()


def pieces(value: Tensor, strata: Strata | None, blocks: Tensor | None) -> list[Tensor]:
    """What of ``value`` the update ratio reads: the whole, or the drawn ``blocks`` of its ``strata``
    gathered (wide runs' and narrow runs' apart, flat) and its tail, in the order of :attr:`Strata.weights`.
    A non-contiguous parameter (rare: a transposed or channels-last weight) is flattened through a copy."""
    if strata is None or blocks is None:
        return [value]
    flat = value.reshape(-1)
    body = flat.numel() - flat.numel() % BLOCK
    gathered = flat[:body].view(-1, BLOCK).index_select(0, blocks)
    out = [gathered[: strata.wide].reshape(-1), gathered[strata.wide :].reshape(-1), flat[body:]]
    return [t for t in out if t.numel()]


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
