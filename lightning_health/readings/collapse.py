"""Collapsed units: pure on-device functions for "which units say the same thing for every input".

A layer's pooled ``act_std`` mixes two spreads: across the examples of the batch (information
about the input) and across units (each unit's own constant). A layer whose units are each stuck at
a different constant has a healthy pooled std and carries nothing. The per-unit reading keeps the
two apart: per unit, the sum and the sum of squares over every other axis (examples, positions),
from which each unit's std across the batch follows.

A unit is *collapsed* when its std is at most ``ratio`` times the layer's RMS (the root of the
mean square over all its units and values), so the test is free of the activation's scale. Units
that are exactly 0 everywhere (sum of squares 0) are *not* counted: a silent unit is what the
``dead`` and dormancy readings report, and counting it here too would report one dead layer twice.
Units seen on fewer than 2 values have no spread to measure and are left out of both the count
and the units measured.

Totals are float64 and summed across micro-batches, call repeats and DDP ranks with a plain sum;
the stds are derived after the sum, once per sampled step.

Example:
    >>> x = torch.tensor([[1.0, 0.0, 5.0], [1.0, 0.0, -5.0], [1.0, 0.0, 0.0]])
    >>> m = unit_moments(x)
    >>> collapsed_units(m, torch.tensor(3.0), ratio=1e-3).tolist()
    [1.0, 2.0]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_health.readings.fused import chunks

_WIDE = torch.float64


def unit_moments(x: Tensor, neuron_dim: int = -1, scratch: Tensor | None = None) -> Tensor:
    """Per unit, the sum and the sum of squares of ``x`` over every axis but ``neuron_dim``.

    Units on the last axis (a linear layer's features, a transformer's hidden units) take one
    batch-norm statistics pass per :data:`_ROWS` rows: each unit's mean and its variance about that
    mean, from which the float64 sums follow. Units with positions after them (conv channels) are
    summed in float32 along each row of positions and added in float64; on a CPU only the units too
    close to constant for that (none in a healthy layer) are read again, shifted by each unit's first
    value, which is how every unit is read on an accelerator (no host read there). Either way a unit
    stuck at a large constant keeps a precise std (no ``E[x^2] - E[x]^2`` of float32 sums), and the
    sums are within ~2e-6 relative of float64.

    Args:
        x: the module output, any floating dtype (half is widened to float32 first).
        neuron_dim: the axis that indexes units (``-1`` for features, ``1`` for conv channels), as
            in :func:`lightning_health.readings.dormancy.unit_abs_sums`.
        scratch: an optional reusable float32 buffer for the shifted values (see
            :class:`lightning_health.readings.reductions.Scratch`); a tensor larger than it is
            read a few examples at a time.

    Returns:
        A float64 vector ``[sums..., sums_of_squares...]`` of length ``2 * units``.

    Example:
        >>> unit_moments(torch.tensor([[1.0, 2.0], [3.0, 2.0]])).tolist()
        [4.0, 4.0, 10.0, 8.0]
    """
    x = x.detach()
    if x.dim() == 0:
        x = x.reshape(1)
    dim = neuron_dim % x.dim()
    if x.dim() == 1:
        x, dim = x.unsqueeze(0), 1
    if x.dtype not in (torch.float32, _WIDE):
        x = x.float()
    pre, units, post = math.prod(x.shape[:dim]), x.shape[dim], math.prod(x.shape[dim + 1 :])
    if x.numel() == 0:
        return torch.zeros(2 * units, dtype=_WIDE, device=x.device)
    if post == 1 and x.device.type in _STATS_DEVICES:  # units on the last axis (features, tokens x features)
        return _row_moments(x.reshape(pre, units))
    rows = x.reshape(pre, units, post)
    if x.device.type == "cpu":  # a host read decides which units need the shifted pass (free on a CPU)
        return _position_moments(rows, scratch)
    return _shifted_moments(rows, scratch)


def _shifted_moments(rows: Tensor, scratch: Tensor | None) -> Tensor:
    """:func:`unit_moments` of ``(examples, units, positions)``, each unit shifted by its first value."""
    pre, units, post = rows.shape
    ref = rows[0, :, 0].reshape(1, units, 1)
    s1 = torch.zeros(units, dtype=_WIDE, device=rows.device)
    s2 = torch.zeros(units, dtype=_WIDE, device=rows.device)
    per_row = units * post
    fits = scratch is not None and scratch.dtype == rows.dtype and per_row <= scratch.numel()
    step = scratch.numel() // per_row if fits else pre  # type: ignore[union-attr]
    for part in chunks(rows, step):
        out = scratch[: part.numel()].view(part.shape) if fits else None  # type: ignore[index]
        _add_shifted_sums(torch.sub(part, ref, out=out), s1, s2)
    c, n = ref.reshape(units).to(_WIDE), float(pre * post)
    return torch.cat([s1 + n * c, s2 + c * (2 * s1 + n * c)])


_NEAR_CONSTANT = 1e-4
"""A unit whose float32 variance is at most this share of its mean square is read again, shifted:
its unshifted float32 sums (~2e-6 relative) cannot tell its spread from rounding."""


def _position_moments(rows: Tensor, scratch: Tensor | None) -> Tensor:
    """:func:`unit_moments` of CPU ``(examples, units, positions)``: two reads, no temporary written.

    The sums and norms of each row of positions, unshifted, widened and added in float64, give every
    unit's moments; only units too close to constant for those to resolve (see
    :data:`_NEAR_CONSTANT`, read on the host) are read again by :func:`_shifted_moments`. A healthy
    layer has none: half the passes of shifting every unit.
    """
    pre, _units, post = rows.shape
    s1 = rows.sum(dim=2).to(_WIDE).sum(dim=0)
    s2 = torch.linalg.vector_norm(rows, dim=2).to(_WIDE).square_().sum(dim=0)
    n = float(pre * post)
    mean = s1 / n
    # NaN (a non-finite unit) is not near; a unit at exactly 0 everywhere has exact sums already
    near = ((s2 / n - mean * mean) <= _NEAR_CONSTANT * (s2 / n)) & (s2 > 0)
    if bool(near.any()):
        idx = near.nonzero().reshape(-1)
        again = _shifted_moments(rows.index_select(1, idx), scratch)
        s1[idx], s2[idx] = again[: idx.numel()], again[idx.numel() :]
    return torch.cat([s1, s2])


_BLOCK = 256
"""Values per float32 partial sum in :func:`unit_moments` (examples, when a unit has one value per example)."""
_STATS_DEVICES = ("cpu", "cuda")
"""Devices whose ``batch_norm_update_stats`` :func:`_row_moments` relies on; others take the shifted sums."""
_ROWS = 2048
"""Rows per batch-norm statistics call in :func:`_row_moments` (its sums accumulate in float32: within
~2e-6 relative of float64 up to 4096 rows, 1e-5 at 65536)."""


def _row_moments(rows: Tensor) -> Tensor:
    """:func:`unit_moments` of ``(examples, units)``: one read per :data:`_ROWS` rows.

    ``batch_norm_update_stats`` gives each unit's mean and its variance about that mean in one
    vectorised pass (five times faster on a CPU than shifting, squaring and summing in eager ops);
    ``n * mean`` and ``n * (var + mean^2)`` in float64 are the sums, and the variance the collapse
    reading derives from them again is the one measured about the mean, so nothing cancels.
    """
    total: Tensor | None = None
    for part in chunks(rows, _ROWS):
        stats = torch.stack(torch.batch_norm_update_stats(part, None, None, 0.0)).to(_WIDE)  # [mean, var]
        mean, square = stats.unbind(0)
        square.addcmul_(mean, mean)  # var + mean^2: the mean square
        stats.mul_(float(part.shape[0]))  # the sums
        total = stats if total is None else total.add_(stats)
    assert total is not None
    return total.view(-1)


def _add_shifted_sums(dev: Tensor, s1: Tensor, s2: Tensor) -> None:
    """Add the per-unit float64 sums and sums of squares of ``dev`` (``(examples, units, positions)``,
    overwritten) to ``s1`` and ``s2``."""
    if dev.shape[2] > 1:  # positions: float32 sums along the contiguous rows, float64 across examples
        s1 += dev.sum(dim=2).to(_WIDE).sum(dim=0)
        s2 += torch.linalg.vector_norm(dev, dim=2).to(_WIDE).square_().sum(dim=0)
        return
    flat = dev.reshape(dev.shape[0], dev.shape[1])
    body = flat.shape[0] - flat.shape[0] % _BLOCK
    parts = [flat[:body].reshape(-1, _BLOCK, flat.shape[1])] if body else []
    if body < flat.shape[0]:
        parts.append(flat[body:].unsqueeze(0))
    for blocks in parts:  # a norm across examples is 20x slower on a CPU than squaring in place and summing
        s1 += blocks.sum(dim=1).to(_WIDE).sum(dim=0)
    flat.square_()
    for blocks in parts:
        s2 += blocks.sum(dim=1).to(_WIDE).sum(dim=0)


def collapsed_units(moments: Tensor, count: Tensor | float, ratio: float) -> Tensor:
    """``[collapsed units, live units measured]`` (float64, on the device) from summed :func:`unit_moments`.

    Live: not exactly 0 on every value (such a unit is `dead`, not collapsed), so a layer whose live
    units are all constant reads 1.0 however many of its units died (a constant input does both).

    Args:
        moments: ``[sums..., sums_of_squares...]`` summed over batches (and ranks).
        count: how many values each unit's sums hold.
        ratio: a unit is collapsed when its std is ``<= ratio`` times the layer's RMS.
    """
    units = moments.numel() // 2
    sums, squares = moments[:units], moments[units:]
    n = torch.as_tensor(count, dtype=_WIDE, device=moments.device).reshape(())
    measured = (n >= 2).to(_WIDE)
    n_safe = n.clamp(min=1)
    mean = sums / n_safe
    var = (squares / n_safe - mean * mean).clamp_(min=0)
    mean_square = squares.sum() / (n_safe * max(units, 1))
    live = ~(squares <= 0)  # units at exactly 0 everywhere are left to `dead`: the share is of the others
    constant = live & (var <= (ratio * ratio) * mean_square)
    share_of = live.sum().to(_WIDE)
    share_of = torch.where(share_of > 0, share_of, torch.full_like(share_of, float(units)))  # none live: 0 of all
    return torch.stack([constant.sum().to(_WIDE) * measured, measured * share_of])
