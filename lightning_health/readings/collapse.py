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
    [1.0, 3.0]
"""

from __future__ import annotations

import torch
from torch import Tensor

_WIDE = torch.float64


def unit_moments(x: Tensor, neuron_dim: int = -1) -> Tensor:
    """Per unit, the sum and the sum of squares of ``x`` over every axis but ``neuron_dim``.

    Args:
        x: the module output, any floating dtype; summed in float64, so the std of a unit whose
            values all equal a large constant stays ~1e-8 of it instead of drowning in rounding.
        neuron_dim: the axis that indexes units (``-1`` for features, ``1`` for conv channels), as
            in :func:`lightning_health.readings.dormancy.unit_abs_sums`.

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
    others = [d for d in range(x.dim()) if d != dim]
    if not others:
        x = x.unsqueeze(0)
        others, dim = [0], 1
    sums = x.sum(dim=others, dtype=_WIDE)
    squares = torch.linalg.vector_norm(x, 2, dim=others, dtype=_WIDE).square_()
    return torch.cat([sums.reshape(-1), squares.reshape(-1)])


def collapsed_units(moments: Tensor, count: Tensor | float, ratio: float) -> Tensor:
    """``[collapsed units, units measured]`` (float64, on the device) from summed :func:`unit_moments`.

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
    constant = (squares > 0) & (var <= (ratio * ratio) * mean_square)
    return torch.stack([constant.sum().to(_WIDE) * measured, measured * units])
