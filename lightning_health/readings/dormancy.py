"""Dormant units (Sokar et al., ICML 2023) and when each unit last fired: pure on-device functions.

A unit's *dormancy score* compares its mean absolute activation with the layer's average of that
quantity::

    s_i = mean|a_i| / ((1 / F) * sum_j mean|a_j|)

and the unit is *tau-dormant* when ``s_i <= tau``. With ``tau = 0`` a unit is dormant exactly when
it output 0 everywhere, which for ReLU is the same as *dead* (never fired). With a small ``tau``
(the paper also uses 0.025 and 0.1) the reading also catches units that still fire, but so weakly
that the next layer barely hears them, for any activation (GELU, SiLU and tanh units are almost
never exactly 0).

The monitor accumulates raw totals (the per-unit sum of ``|a|`` and the number of values summed)
across a window of batches and across DDP ranks with a plain sum, and derives the scores
afterwards: the ratio of means needs totals, not per-batch ratios.

Example:
    >>> a = torch.tensor([[0.0, 1.0, 2.0, 0.01], [0.0, 3.0, 2.0, 0.03]])
    >>> sums = unit_abs_sums(a, neuron_dim=-1)
    >>> dormant_mask(sums, counts=2, tau=0.025).tolist()
    [True, False, False, True]
    >>> dormant_mask(sums, counts=2, tau=0.0).tolist()
    [True, False, False, False]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_health.readings.fused import chunks

_WIDE = torch.float64


def _unit_dim(x: Tensor, neuron_dim: int) -> int:
    if not -x.dim() <= neuron_dim < x.dim():
        raise ValueError(
            f"Expected `neuron_dim` to index a dimension of the {x.dim()}-d activation of shape {tuple(x.shape)}, "
            f"got {neuron_dim}; use -1 for features or 1 for conv channels"
        )
    return neuron_dim % x.dim()


def unit_abs_sums(x: Tensor, neuron_dim: int = -1, scratch: Tensor | None = None) -> Tensor:
    """Per-unit sum of ``|activation|`` over every example and position of one batch.

    Args:
        x: the post-activation tensor, any floating dtype (bf16/fp16 are widened to float32 before summing).
        neuron_dim: the axis that indexes units (``-1`` for features, ``1`` for conv channels).
        scratch: an optional reusable float32 buffer for ``|x|``, used a few examples at a time
            when at least one example fits (see :class:`lightning_health.readings.reductions.Scratch`).

    Returns:
        A float64 vector with one entry per unit, on ``x``'s device. NaN propagates: a unit that
        saw a NaN has a NaN sum (and :func:`dormant_scores` then leaves it out, see there); the
        ``nonfinite`` reading is where NaN is reported.

    Raises:
        ValueError: if ``neuron_dim`` does not index a dimension of ``x``.

    Example:
        >>> unit_abs_sums(torch.tensor([[1.0, -2.0], [-3.0, 0.0]])).tolist()
        [4.0, 2.0]
    """
    x = x.detach()
    if x.dim() == 0:
        x = x.reshape(1)
    dim = _unit_dim(x, neuron_dim)
    others = [d for d in range(x.dim()) if d != dim]
    # Sum each batch in float32 (half inputs widened first) and widen the per-unit sums: a float64
    # copy of the whole activation costs ~20x more on CPU, and the ratio against tau needs no more.
    # Exact zeros stay exact, so tau = 0 still means "output 0 everywhere".
    if x.dtype != _WIDE:
        x = x.float()  # no copy for float32
    if not others:
        return x.abs().to(_WIDE)
    per_row = x.numel() // max(x.shape[0], 1)
    if scratch is None or x.dtype != scratch.dtype or dim == 0 or per_row == 0 or per_row > scratch.numel():
        return x.abs().sum(dim=others).to(_WIDE)
    # |x| of a few examples at a time into the reused buffer: a fresh full-size temporary costs
    # ~4x the sum on a CPU for a conv activation.
    rows = scratch.numel() // per_row
    total = None
    for part in chunks(x, rows):
        s = torch.abs(part, out=scratch[: part.numel()].view(part.shape)).sum(dim=others)
        total = s if total is None else total.add_(s)
    assert total is not None
    return total.to(_WIDE)


def unit_counts(x: Tensor, neuron_dim: int = -1) -> int:
    """How many values each unit's entry of :func:`unit_abs_sums` adds up (examples x positions).

    Example:
        >>> unit_counts(torch.zeros(8, 3, 5, 5), neuron_dim=1)
        200
    """
    if x.dim() == 0:
        return 1
    dim = _unit_dim(x, neuron_dim)
    units = x.shape[dim]
    return x.numel() // units if units else 0


def dormant_scores(abs_sums: Tensor, counts: Tensor | int | float) -> Tensor:
    """The dormancy score ``s_i`` of every unit (the module docstring has the formula).

    Args:
        abs_sums: per-unit sums of ``|activation|`` (:func:`unit_abs_sums`, summed over a window).
        counts: how many values each sum adds up: one number for the layer, or one per unit.

    Returns:
        A float64 vector of scores on ``abs_sums``' device; the scores of the finite units average
        to 1. Edge cases, decided without leaving the device: a unit whose sum is NaN/Inf, or
        whose count is 0, scores NaN (no evidence either way) and is left out of the layer
        average, so one NaN does not hide the rest of the layer; when every finite unit's mean is
        0 (a layer that is entirely silent) every finite unit scores 0, so it is dormant for every
        ``tau >= 0``.

    Raises:
        ValueError: if ``counts`` is a negative number.

    Example:
        >>> dormant_scores(torch.tensor([0.0, 2.0, 4.0]), counts=2).tolist()
        [0.0, 1.0, 2.0]
    """
    if not isinstance(counts, Tensor) and not counts >= 0:
        raise ValueError(f"Expected `counts` to be >= 0 (values summed per unit), got {counts}")
    sums = abs_sums.detach().to(_WIDE)
    counts_t = torch.as_tensor(counts, dtype=_WIDE, device=sums.device)
    means = sums / counts_t
    finite = torch.isfinite(means)
    n_finite = finite.sum()
    layer_mean = torch.where(finite, means, torch.zeros_like(means)).sum() / n_finite.clamp(min=1)
    scores = torch.where(layer_mean > 0, means / layer_mean, torch.zeros_like(means))
    return torch.where(finite, scores, torch.full_like(means, math.nan))


def dormant_mask(abs_sums: Tensor, counts: Tensor | int | float, tau: float) -> Tensor:
    """Which units are tau-dormant: ``s_i <= tau``. Units with a NaN score are never dormant.

    Args:
        abs_sums: per-unit sums of ``|activation|``.
        counts: values per unit (a number or one per unit).
        tau: the threshold, ``>= 0``. ``0.0`` flags units that were exactly 0 everywhere (dead, for
            ReLU); ``0.025`` is the paper's setting that also catches nearly silent units.

    Returns:
        A bool vector with one entry per unit, on ``abs_sums``' device.

    Raises:
        ValueError: if ``tau`` is negative or not finite.
    """
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0):
        raise ValueError(f"Expected `tau` to be a finite number >= 0, got {tau!r}")
    return dormant_scores(abs_sums, counts) <= tau


def update_last_fired(last_fired: Tensor, fired: Tensor, step: int) -> Tensor:
    """Record ``step`` for every unit that fired; the others keep their previous step.

    Args:
        last_fired: int64 per-unit steps; ``-1`` means "not seen firing yet".
        fired: bool per-unit mask of the units that fired at ``step`` (``unit_fire_mask``).
        step: the global step of the reading.

    Returns:
        A new int64 vector (inputs are not modified).

    Raises:
        ValueError: if the two vectors do not have the same shape.

    Example:
        >>> last = torch.full((3,), -1)
        >>> last = update_last_fired(last, torch.tensor([True, False, True]), 10)
        >>> update_last_fired(last, torch.tensor([False, False, True]), 20).tolist()
        [10, -1, 20]
    """
    if last_fired.shape != fired.shape:
        raise ValueError(
            f"Expected `fired` to have the shape of `last_fired` {tuple(last_fired.shape)}, got {tuple(fired.shape)}"
        )
    return torch.where(fired.to(torch.bool), torch.full_like(last_fired, step), last_fired)
