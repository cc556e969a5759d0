"""Pure on-device reductions: one tensor in, a small vector of raw totals out.

Everything here is a torch function of tensors with no Python loop over elements and no host
transfer. Results are *raw totals* (count, sum, sum of squares, min, max, counts) rather than
means, because raw totals add up across micro-batches, repeated calls and DDP ranks; means, stds
and fractions are derived on the host afterwards (:func:`derive_activation`,
:func:`derive_gradient`).

Totals accumulate in float64 so a sum of squares of large finite half-precision activations never
reads as ``inf``; half inputs are widened to float32 before any comparison or histogram, because
``histc`` on bfloat16/float16 CPU tensors miscounts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# Layout of the activation totals vector.
A_COUNT, A_SUM, A_SUMSQ, A_MIN, A_MAX, A_ZEROS, A_SATURATED, A_NONFINITE = range(8)
ACTIVATION_WIDTH = 8
# Layout of the gradient totals vector.
G_COUNT, G_SUM, G_SUMSQ, G_ABSMAX, G_NONFINITE = range(5)
GRADIENT_WIDTH = 5

_WIDE = torch.float64


def _as_float(x: Tensor) -> Tensor:
    """Detach and widen half/integer tensors to float32 (exact for bf16/fp16); keep fp32/fp64."""
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return x


def empty_activation_totals(device: torch.device | str = "cpu") -> Tensor:
    """The identity element for :func:`combine_activation_totals` (no values seen)."""
    out = torch.zeros(ACTIVATION_WIDTH, dtype=_WIDE, device=device)
    out[A_MIN] = math.inf
    out[A_MAX] = -math.inf
    return out


def empty_gradient_totals(device: torch.device | str = "cpu") -> Tensor:
    """The identity element for :func:`combine_gradient_totals`."""
    return torch.zeros(GRADIENT_WIDTH, dtype=_WIDE, device=device)


def _scaled_moments(
    x: Tensor, lo: Tensor, hi: Tensor, scratch: Tensor | None, count_zeros: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sum, sum of squares, non-finite count and zero count of a flat float tensor, in float32 passes.

    When all values lie on one side of zero they are centred on the midpoint ``c`` of
    ``[min, max]`` (otherwise ``c = 0``), and scaled by a power of two so the largest deviation is
    below 1, into ``scratch``. Then:

    - float32 sums of the centred values lose nothing to cancellation, so a collapsed layer
      (5.0 +- 1e-4) keeps a precise std; the raw sums are rebuilt in float64 as
      ``sum = S1 + n c`` and ``sum_sq = S2 + 2 c S1 + n c^2``;
    - the float32 sum of squares is at most ``n`` and cannot overflow, whatever the magnitudes;
    - the buffer is reused across calls: on a CPU a fresh full-size temporary, or a boolean mask,
      costs many times the arithmetic, so the counts are float passes over the same buffer too.
    """
    buf = scratch[: x.numel()] if scratch is not None and scratch.numel() >= x.numel() else torch.empty_like(x)
    n = float(x.numel())
    zeros = x.new_zeros((), dtype=_WIDE)
    if count_zeros:  # ceil(min(|x|, 1)) is 1 for any nonzero (subnormals too), 0 for 0; NaN -> 1 (not zero)
        nonzero = torch.abs(x, out=buf).clamp_(max=1.0).ceil_().nan_to_num_(nan=1.0).sum()
        zeros = n - nonzero.to(_WIDE)
    lo64, hi64 = lo.to(_WIDE), hi.to(_WIDE)
    # Shift only when every value lies on one side of zero: then mean^2 can dwarf the variance.
    centre = torch.where((lo64 > 0) | (hi64 < 0), (lo64 + hi64) / 2, 0.0).nan_to_num_(0.0, 0.0, 0.0)
    reach = torch.maximum(hi64 - centre, centre - lo64).nan_to_num_(0.0, 0.0, 0.0)
    scale = torch.ldexp(torch.ones_like(reach), -torch.frexp(reach).exponent)  # exact power of two
    torch.sub(x, centre.to(x.dtype), out=buf).mul_(scale.to(x.dtype))
    s1 = buf.sum().to(_WIDE) / scale
    s2 = torch.linalg.vector_norm(buf).to(_WIDE).square() / scale.square()
    nonfinite = buf.sub_(buf).nan_to_num_(nan=1.0).sum().to(_WIDE)  # x - x is NaN exactly where x is NaN/Inf
    return s1 + n * centre, s2 + 2 * centre * s1 + n * centre.square(), nonfinite, zeros


def activation_totals(
    y: Tensor, bounds: tuple[float, float] | None = None, margin: float = 0.01, scratch: Tensor | None = None
) -> Tensor:
    """Raw totals of one activation tensor, as a float64 vector on ``y``'s device.

    Args:
        y: the activation (any shape, any floating dtype).
        bounds: ``(low, high)`` output bounds of an activation with flat shoulders (tanh, sigmoid,
            hardtanh, ...). An element counts as saturated when it lies within ``margin`` of the
            output range from either bound. ``None`` means the activation has no flat shoulder and
            nothing counts as saturated (a large positive ReLU input is not saturated).
        margin: the saturation band as a fraction of ``high - low``.
        scratch: an optional float32 buffer of at least ``y.numel()`` elements to reuse for the
            temporary (see :class:`Scratch`); its contents are overwritten.

    Returns:
        ``[count, sum, sum_sq, min, max, zeros, saturated, nonfinite]``. Moments include every
        element, so a tensor holding NaN has NaN moments; ``nonfinite`` counts NaN and +-Inf.

    Example:
        >>> t = activation_totals(torch.tensor([0.0, 1.0, 3.0]))
        >>> t[A_COUNT].item(), t[A_SUM].item(), t[A_ZEROS].item()
        (3.0, 4.0, 1.0)
    """
    x = _as_float(y).reshape(-1)
    if x.numel() == 0:
        return empty_activation_totals(x.device)
    lo, hi = torch.aminmax(x)
    if bounds is None:
        saturated = torch.zeros((), dtype=_WIDE, device=x.device)
    else:
        low, high = bounds
        band = margin * (high - low)
        saturated = ((x <= low + band) | (x >= high - band)).sum(dtype=_WIDE)
    total, total_sq, nonfinite, zeros = _scaled_moments(x, lo, hi, scratch, count_zeros=True)
    return torch.stack(
        [
            x.new_full((), float(x.numel()), dtype=_WIDE),  # a fill kernel, not a host-to-device copy
            total,
            total_sq,
            lo.to(_WIDE),
            hi.to(_WIDE),
            zeros,
            saturated,
            nonfinite,
        ]
    )


def gradient_totals(g: Tensor, scratch: Tensor | None = None) -> Tensor:
    """Raw totals of one gradient tensor: ``[count, sum, sum_sq, max_abs, nonfinite]`` (float64).

    Example:
        >>> gradient_totals(torch.tensor([3.0, -4.0]))[G_SUMSQ].item()
        25.0
    """
    x = _as_float(g).reshape(-1)
    if x.numel() == 0:
        return empty_gradient_totals(x.device)
    lo, hi = torch.aminmax(x)
    total, total_sq, nonfinite, _ = _scaled_moments(x, lo, hi, scratch, count_zeros=False)
    return torch.stack(
        [
            x.new_full((), float(x.numel()), dtype=_WIDE),
            total,
            total_sq,
            torch.maximum(-lo, hi).to(_WIDE),  # max |g| without an abs() temporary
            nonfinite,
        ]
    )


class Scratch:
    """One reusable float32 buffer per device, grown to the largest tensor seen.

    The reductions write one temporary per tensor; reusing it keeps a sampled step from
    allocating (and, on a CPU, page-faulting) a fresh full-size buffer for every layer.
    """

    def __init__(self) -> None:
        self._buffers: dict[torch.device, Tensor] = {}

    def get(self, like: Tensor) -> Tensor:
        buf = self._buffers.get(like.device)
        if buf is None or buf.numel() < like.numel():
            buf = torch.empty(like.numel(), dtype=torch.float32, device=like.device)
            self._buffers[like.device] = buf
        return buf

    def clear(self) -> None:
        self._buffers.clear()


def combine_activation_totals(a: Tensor, b: Tensor) -> Tensor:
    """Totals of the union of two sets of values (sums add, min/max combine)."""
    out = a + b
    out[A_MIN] = torch.minimum(a[A_MIN], b[A_MIN])
    out[A_MAX] = torch.maximum(a[A_MAX], b[A_MAX])
    return out


def combine_gradient_totals(a: Tensor, b: Tensor) -> Tensor:
    """Totals of the union of two sets of gradient values."""
    out = a + b
    out[G_ABSMAX] = torch.maximum(a[G_ABSMAX], b[G_ABSMAX])
    return out


def unit_fire_mask(y: Tensor, neuron_dim: int) -> Tensor:
    """Per-unit "fired at least once": ``output > 0`` on any example (and position) of the batch.

    Args:
        y: the post-activation tensor.
        neuron_dim: the axis that indexes units (``-1`` for features, ``1`` for conv channels).

    Returns:
        A bool vector with one entry per unit. A unit with a NaN output counts as fired (it is
        reported as non-finite, not as dead).

    Example:
        >>> unit_fire_mask(torch.tensor([[0.0, 2.0], [0.0, 0.0]]), -1).tolist()
        [False, True]
    """
    x = y.detach()
    if x.dim() == 0:
        x = x.reshape(1)
    dim = neuron_dim % x.dim()
    if x.shape[dim] == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device)
    if x.numel() == 0:
        return torch.zeros(x.shape[dim], dtype=torch.bool, device=x.device)
    others = [d for d in range(x.dim()) if d != dim]
    unit_max = x.amax(dim=others) if others else x
    # A unit whose outputs are NaN is broken, not silent: the `nonfinite` reading reports it, and
    # counting it as fired keeps it out of the dead fraction.
    return (unit_max > 0) | unit_max.isnan()


def histogram_sample(x: Tensor, max_samples: int) -> Tensor:
    """A fixed-size, deterministic strided sample of ``x`` (every k-th element), as float32.

    The same rule on the host reproduces the sample exactly, which is what lets tests compare our
    counts to NumPy's.
    """
    flat = _as_float(x).reshape(-1)
    n = flat.numel()
    if n > max_samples:
        stride = -(-n // max_samples)
        flat = flat[::stride]
    return flat.float()


def histogram_counts(x: Tensor, edges: Tensor) -> Tensor:
    """Counts of ``x`` in the bins given by ``edges``, with nothing dropped.

    Returns a float64 vector of length ``len(edges) + 2``:
    ``[below edges[0], bin 0, ..., bin B-1, above edges[-1], nonfinite]`` where bin i holds
    ``edges[i] <= v < edges[i+1]`` and the last bin also holds ``v == edges[-1]`` (NumPy's rule).

    Example:
        >>> histogram_counts(torch.tensor([-5.0, 0.5, 1.0, float("nan")]), torch.tensor([0.0, 1.0])).tolist()
        [1.0, 2.0, 0.0, 1.0]
    """
    v = _as_float(x).reshape(-1).float().contiguous()
    # Callers on an accelerator pass edges already on its device (a per-call copy would block).
    e = edges if edges.device == v.device and edges.dtype == torch.float32 else edges.to(v.device, torch.float32)
    n_edges = e.numel()
    # right=True gives the count of edges <= v, i.e. bin index + 1 for edges[i] <= v < edges[i+1].
    idx = torch.bucketize(v, e, right=True)
    idx.sub_((v == e[-1]).to(idx.dtype))  # the last bin is closed, as in NumPy
    idx.masked_fill_(~torch.isfinite(v), n_edges + 1)
    return torch.bincount(idx, minlength=n_edges + 2).to(_WIDE)


def symlog_edges(bins: int, smallest: float, largest: float) -> Tensor:
    """Bin edges symmetric around zero and log-spaced in magnitude, fixed before any data is seen.

    Activations and gradients span many orders of magnitude over a run; log-spaced edges keep a
    vanishing gradient (1e-7) and an exploding one (1e3) both visible on one fixed scale, and fixed
    edges make the histograms comparable across steps and identical across DDP ranks.

    Args:
        bins: total number of bins (even; half on each side of zero, the two innermost meet at 0).
        smallest: the smallest magnitude resolved; values in ``(-smallest, smallest)`` share the
            two bins next to zero.
        largest: the largest magnitude binned; beyond it values go to the out-of-range counts.
    """
    if bins < 2 or bins % 2:
        raise ValueError(f"Expected `histogram_bins` to be an even int >= 2, got {bins!r}")
    half = bins // 2
    mags = torch.logspace(math.log10(smallest), math.log10(largest), half, dtype=torch.float64)
    return torch.cat([-mags.flip(0), torch.zeros(1, dtype=torch.float64), mags]).float()


def linear_edges(bins: int, low: float, high: float) -> Tensor:
    """``bins`` equal-width bins over ``[low, high]`` (used for bounded activations)."""
    return torch.linspace(low, high, bins + 1, dtype=torch.float64).float()


def _mean_std(n: float, total: float, total_sq: float) -> tuple[float, float]:
    """Mean and sample std (as ``torch.std``) from a count, a sum and a sum of squares."""
    mean = total / n
    var = max(total_sq / n - mean * mean, 0.0) if math.isfinite(mean) else math.nan
    if n == 1:
        return mean, 0.0
    return mean, (math.sqrt(var * n / (n - 1)) if math.isfinite(var) else math.nan)


def derive_activation(t: Sequence[float]) -> dict[str, float]:
    """Turn activation totals (already on the host) into the logged readings."""
    n = t[A_COUNT]
    if n <= 0:
        return {}
    mean, std = _mean_std(n, t[A_SUM], t[A_SUMSQ])
    return {
        "act_mean": mean,
        "act_std": std,
        "act_min": t[A_MIN],
        "act_max": t[A_MAX],
        "zero_fraction": t[A_ZEROS] / n,
        "saturation": t[A_SATURATED] / n,
        "nonfinite": t[A_NONFINITE],
    }


def derive_gradient(t: Sequence[float]) -> dict[str, float]:
    """Turn gradient totals (on the host) into ``grad_std``, ``grad_max`` and ``grad_norm``."""
    n = t[G_COUNT]
    if n <= 0:
        return {}
    _mean, std = _mean_std(n, t[G_SUM], t[G_SUMSQ])
    return {
        "grad_std": std,
        "grad_max": t[G_ABSMAX],
        "grad_norm": math.sqrt(t[G_SUMSQ]) if t[G_SUMSQ] >= 0 else math.nan,
        "grad_nonfinite": t[G_NONFINITE],
    }
