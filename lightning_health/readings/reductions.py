"""Pure on-device reductions: one tensor in, a small vector of raw totals out.

Everything here is a torch function of tensors with no Python loop over elements and no host
transfer. Results are *raw totals* (count, sum, sum of squares, min, max, counts) rather than
means, because raw totals add up across micro-batches, repeated calls and DDP ranks; means, stds
and fractions are derived on the host afterwards (:func:`derive_activation`,
:func:`derive_gradient`).

Totals accumulate in float64 so a sum of squares of large finite half-precision activations never
reads as ``inf``; half inputs are widened to float32 before any comparison or histogram, because
``histc`` on bfloat16/float16 CPU tensors miscounts.

Two paths compute the same totals. CPU tensors take :mod:`lightning_health.readings.fused`: one
``aminmax`` pass is read on the host (free there) and decides which other passes run, so a typical
layer costs four reads and no written temporary. Accelerator tensors take the branch-free device
path below, which never reads a value on the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_health.readings import fused

# Layout of the activation totals vector.
A_COUNT, A_SUM, A_SUMSQ, A_MIN, A_MAX, A_ZEROS, A_SATURATED, A_NONFINITE = range(8)
ACTIVATION_WIDTH = 8
# Layout of the gradient totals vector.
G_COUNT, G_SUM, G_SUMSQ, G_ABSMAX, G_NONFINITE = range(5)
GRADIENT_WIDTH = 5

_WIDE = torch.float64
_FLOAT32_MAX = torch.finfo(torch.float32).max
# Elements reduced per pass over a large tensor: bounds the reused temporary at 8 MiB whatever the
# layer's size (a 33 MiB conv activation would otherwise keep a 33 MiB buffer alive all run).
CHUNK = 1 << 21
ACCELERATOR_CHUNK = 1 << 23
"""Elements per pass on an accelerator (a 32 MiB temporary), where each pass's dozen small kernels
cost more than its arithmetic: a GPT-2-small MLP activation (25M values at batch 8 x 1024) takes 3
passes instead of 12. Below 2**24, so 0/1 counts summed in float32 stay exact."""
# Elements per written pass on the host-bounds path (CPU): a 2 MiB buffer, read back from cache.
HOST_PASS = 1 << 19


def chunk_size(x: Tensor) -> int:
    """Elements reduced per pass over ``x``: :data:`CHUNK` on a CPU, :data:`ACCELERATOR_CHUNK` elsewhere.

    Example:
        >>> chunk_size(torch.empty(3)) == CHUNK, chunk_size(torch.empty(3, device="meta")) == ACCELERATOR_CHUNK
        (True, True)
    """
    return CHUNK if x.device.type == "cpu" else ACCELERATOR_CHUNK


def reads_bounds(x: Tensor) -> bool:
    """Whether ``x``'s bounds are read on the host to skip passes (:mod:`lightning_health.readings.fused`).

    True for CPU tensors, where a scalar read waits for nothing; on an accelerator it would block
    the host once per layer, so the branch-free device path runs there.
    """
    return x.device.type == "cpu"


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


def _host_buffer(x: Tensor, scratch: Tensor | None) -> Tensor:
    """A temporary of x's dtype for the host-bounds path's passes, which go through ``x`` one buffer
    length at a time: the reused scratch whatever its length, else a fresh one of at most HOST_PASS."""
    if scratch is not None and scratch.dtype == x.dtype and scratch.numel() > 0:
        return scratch
    return torch.empty(min(x.numel(), HOST_PASS), dtype=x.dtype, device=x.device)


def _buffer(x: Tensor, scratch: Tensor | None) -> Tensor:
    """A temporary the size of flat ``x``: the reused scratch when it is large enough and of x's dtype."""
    if scratch is not None and scratch.numel() >= x.numel() and scratch.dtype == x.dtype:
        return scratch[: x.numel()]
    return torch.empty_like(x)


def _centred_moments(x: Tensor, lo: Tensor, hi: Tensor, buf: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 sum and sum of squares of flat ``x``, from float32 passes that neither cancel nor overflow.

    The values are shifted by ``c``, the end of ``[min, max]`` nearest zero when every value lies
    on one side of it (``c = 0`` otherwise), and scaled by a power of two ``s`` so every shifted
    value lies within +-1, into ``buf``. Then:

    - float32 sums of shifted values lose nothing to cancellation, so a collapsed layer
      (5.0 +- 1e-4) keeps a precise std; the raw sums are rebuilt in float64 as
      ``sum = S1 / s + n c`` and ``sum_sq = (S2 / s^2) + c (2 S1 / s + n c)``, where every term
      has the sign of the total (shifted values share the sign of ``c``), so nothing cancels there;
    - the float32 sum of squares is at most about ``n`` and cannot overflow, whatever the magnitudes;
    - both sums are the CPU's fastest kernels (``sum`` and ``vector_norm``, vectorised), and the
      only full-size write goes into the reused buffer: on a CPU a fresh temporary, a boolean
      mask or a float64 widening each cost many times the arithmetic.
    """
    centre = lo.clamp(min=0.0).add_(hi.clamp(max=0.0)).nan_to_num_(0.0, 0.0, 0.0)  # min if > 0, max if < 0
    reach = torch.sub(hi, lo).nan_to_num_(0.0, _FLOAT32_MAX, 0.0)  # >= every |x - c|
    # A power of two (exp2 of an integer); at most 2**126, so a layer of subnormal values is not scaled to inf.
    scale = torch.exp2(torch.frexp(reach).exponent.clamp_(min=-126).neg_().float())
    torch.sub(x, centre, out=buf).mul_(scale)
    wide = torch.stack([buf.sum(), torch.linalg.vector_norm(buf), centre, scale]).to(_WIDE)
    # one-element float64 kernels from here on (on a GPU each costs a launch, not arithmetic): few
    s1_norm, c = wide[:2] / wide[3], wide[2]
    total = torch.add(s1_norm[0], c, alpha=float(x.numel()))  # S1 / s + n c
    return total, (s1_norm[0] + total).mul_(c).addcmul_(s1_norm[1], s1_norm[1])  # (N/s)^2 + c (2 S1/s + n c)


def _count(mark: Tensor) -> Tensor:
    """The number of ones in a float 0/1 buffer of at most one chunk, as float64 (exact: < 2**24)."""
    return mark.sum().to(_WIDE)


def _nonfinite(x: Tensor, buf: Tensor) -> Tensor:
    """How many of ``x`` are NaN or +-Inf: ``x * 0`` is 0 for a finite value and NaN otherwise."""
    return _count(torch.mul(x, 0.0, out=buf).ne_(0.0))


def activation_totals(
    y: Tensor,
    bounds: tuple[float, float] | None = None,
    margin: float = 0.01,
    scratch: Tensor | None = None,
    *,
    thresholds: tuple[float, float] | None = None,
    moments: Tensor | None = None,
) -> Tensor:
    """Raw totals of one activation tensor, as a float64 vector on ``y``'s device.

    Args:
        y: the activation (any shape, any floating dtype).
        bounds: ``(low, high)`` output bounds of an activation with flat shoulders (tanh, sigmoid,
            hardtanh, ...). An element counts as saturated when it lies within ``margin`` of the
            output range from either bound. ``None`` means the activation has no flat shoulder and
            nothing counts as saturated (a large positive ReLU input is not saturated).
        margin: the saturation band as a fraction of ``high - low``.
        thresholds: ``(low, high)``: instead of ``bounds``, an element is saturated when
            ``y <= low`` or ``y >= high`` (``-inf``/``inf`` for a side that never saturates): the
            thresholds an activation's probed profile gives (see
            :attr:`lightning_health.capture.profile.ActivationProfile.saturation`).
        scratch: an optional float32 buffer of at least ``min(y.numel(), chunk_size(y))`` elements to
            reuse for the temporary (see :class:`Scratch`); its contents are overwritten. Tensors
            larger than :func:`chunk_size` are reduced chunk by chunk.
        moments: ``[sum, sum of squares]`` of ``y`` in float64 when the caller already has them
            (the hooks sum per-unit moments, :func:`lightning_health.readings.collapse.unit_moments`):
            on the host-bounds path they replace the two moment passes while ``y`` is finite.

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
    if reads_bounds(x):
        if thresholds is None and bounds is not None:
            band = margin * (bounds[1] - bounds[0])
            thresholds = (bounds[0] + band, bounds[1] - band)
        buf = _host_buffer(x, scratch)
        own = moments is None
        floats = [fused.activation_floats(p, thresholds, buf, own) for p in fused.chunks(x, CHUNK)]
        whole = floats[0] if len(floats) == 1 else fused.combine(floats, mins=(A_MIN,), maxes=(A_MAX,))
        if moments is not None:
            fused.take_moments(whole, moments, (A_SUM, A_SUMSQ, A_MIN, A_MAX))
        return fused.to_device(whole, x.device)
    if x.numel() > chunk_size(x):
        parts = (activation_totals(p, bounds, margin, scratch, thresholds=thresholds) for p in x.split(chunk_size(x)))
        return combine_activation_totals(*parts)
    buf = _buffer(x, scratch)
    lo, hi = torch.aminmax(x)
    total, total_sq = _centred_moments(x, lo, hi, buf)
    zeros = _count(torch.eq(x, 0.0, out=buf))
    if thresholds is not None:
        saturated = _beyond(x, thresholds, buf, zeros)
    elif bounds is None:
        saturated = zeros.new_zeros(())
    else:  # within `band` of either bound, i.e. |x - middle| >= half width - band
        low, high = bounds
        band = margin * (high - low)
        saturated = _count(torch.sub(x, (low + high) / 2, out=buf).abs_().ge_((high - low) / 2 - band))
    nonfinite = _nonfinite(x, buf)
    count = x.new_full((), float(x.numel()), dtype=_WIDE)  # a fill kernel, not a host-to-device copy
    # stack promotes the float32 min and max to float64 in the same call
    return torch.stack([count, total, total_sq, lo, hi, zeros, saturated, nonfinite])


def _beyond(x: Tensor, thresholds: tuple[float, float], buf: Tensor, zero: Tensor) -> Tensor:
    """How many of ``x`` are ``<= low`` or ``>= high``: one comparison pass whichever sides are finite."""
    low, high = thresholds
    if math.isinf(low) and math.isinf(high):
        return zero.new_zeros(())
    if math.isinf(low):
        return _count(torch.ge(x, high, out=buf))
    if math.isinf(high):
        return _count(torch.le(x, low, out=buf))
    return _count(torch.sub(x, (low + high) / 2, out=buf).abs_().ge_((high - low) / 2))


def gradient_totals(g: Tensor, scratch: Tensor | None = None) -> Tensor:
    """Raw totals of one gradient tensor: ``[count, sum, sum_sq, max_abs, nonfinite]`` (float64).

    Example:
        >>> gradient_totals(torch.tensor([3.0, -4.0]))[G_SUMSQ].item()
        25.0
    """
    x = _as_float(g).reshape(-1)
    if x.numel() == 0:
        return empty_gradient_totals(x.device)
    if reads_bounds(x):
        buf = _host_buffer(x, scratch)
        floats = [fused.gradient_floats(p, buf) for p in fused.chunks(x, CHUNK)]
        whole = floats[0] if len(floats) == 1 else fused.combine(floats, mins=(), maxes=(G_ABSMAX,))
        return fused.to_device(whole, x.device)
    if x.numel() > chunk_size(x):
        return combine_gradient_totals(*(gradient_totals(part, scratch) for part in x.split(chunk_size(x))))
    buf = _buffer(x, scratch)
    lo, hi = torch.aminmax(x)
    total, total_sq = _centred_moments(x, lo, hi, buf)
    count = x.new_full((), float(x.numel()), dtype=_WIDE)
    max_abs = torch.maximum(lo.neg(), hi)  # max |g| without an abs() pass
    return torch.stack([count, total, total_sq, max_abs, _nonfinite(x, buf)])


class Scratch:
    """One reusable float32 buffer per device, as large as the largest tensor seen up to one chunk
    (:data:`HOST_PASS` on a CPU, whose passes go through a tensor one buffer length at a time).

    The reductions write one temporary per tensor (per chunk of a large one); reusing it keeps a
    sampled step from allocating (and, on a CPU, page-faulting) a fresh buffer for every layer.
    :meth:`clear` drops it between sampled steps that are not consecutive, so plain steps hold none.
    """

    def __init__(self) -> None:
        self._buffers: dict[torch.device, Tensor] = {}

    def get(self, like: Tensor) -> Tensor:
        buf = self._buffers.get(like.device)
        size = min(like.numel(), HOST_PASS if reads_bounds(like) else chunk_size(like))
        if buf is None or buf.numel() < size:
            buf = torch.empty(size, dtype=torch.float32, device=like.device)
            self._buffers[like.device] = buf
        return buf

    def clear(self) -> None:
        self._buffers.clear()


def _combine(totals: Sequence[Tensor], mins: tuple[int, ...], maxes: tuple[int, ...]) -> Tensor:
    """Totals of the union of several sets of values: sums add, the fields at ``mins``/``maxes`` combine."""
    parts = torch.stack(list(totals))
    out = parts.sum(0)
    for i in mins:
        out[i] = parts[:, i].amin()
    for i in maxes:
        out[i] = parts[:, i].amax()
    return out


def combine_activation_totals(*totals: Tensor) -> Tensor:
    """Totals of the union of sets of values (sums add, min/max combine): calls, micro-batches, chunks."""
    return _combine(totals, mins=(A_MIN,), maxes=(A_MAX,))


def combine_gradient_totals(*totals: Tensor) -> Tensor:
    """Totals of the union of sets of gradient values."""
    return _combine(totals, mins=(), maxes=(G_ABSMAX,))


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
    if x.is_contiguous():  # (before, units, after): reduce the contiguous inner axis first (2x faster on conv outputs)
        rows = x.reshape(math.prod(x.shape[:dim]), x.shape[dim], math.prod(x.shape[dim + 1 :]))  # a view
        unit_max = (rows.amax(dim=2) if rows.shape[2] > 1 else rows[:, :, 0]).amax(dim=0)
    else:
        others = [d for d in range(x.dim()) if d != dim]
        unit_max = x.amax(dim=others) if others else x
    # A unit whose outputs are NaN is broken, not silent: the `nonfinite` reading reports it, and
    # counting it as fired keeps it out of the dead fraction.
    return (unit_max > 0) | unit_max.isnan()


def fired_from_sums(sums: Tensor) -> Tensor:
    """:func:`unit_fire_mask` of an activation that is never negative, from its per-unit sums: a
    sum of values >= 0 is > 0 exactly when one of them is; NaN counts as fired, as there.

    Example:
        >>> fired_from_sums(torch.tensor([0.0, 3.0, float("nan")])).tolist()
        [False, True, True]
    """
    return ~(sums <= 0)


def histogram_sample(x: Tensor, max_samples: int) -> Tensor:
    """A fixed-size, deterministic strided sample of ``x`` (every k-th element), as float32.

    The same rule on the host reproduces the sample exactly, which is what lets tests compare our
    counts to NumPy's.
    """
    flat = x.detach().reshape(-1)
    n = flat.numel()
    if n > max_samples:
        stride = -(-n // max_samples)
        flat = flat[::stride]
    return flat.float()  # widened after striding: a half tensor is not converted whole (exact either way)


def bucket_boundaries(edges: Tensor) -> Tensor:
    """Boundaries that let one ``bucketize`` produce :func:`histogram_counts`' whole layout.

    The last edge is nudged up to the next float, so a value equal to it lands in the last bin
    (NumPy's closed last bin), and the largest float32 is appended, so ``+inf`` (every non-finite
    value is mapped there first) gets a slot of its own. Computed once per set of edges.
    """
    e = edges.detach().to(torch.float32).clone()
    e[-1] = torch.nextafter(e[-1], torch.tensor(math.inf, dtype=torch.float32, device=e.device))
    return torch.cat([e, e.new_full((1,), _FLOAT32_MAX)])


def histogram_counts(x: Tensor, edges: Tensor, boundaries: Tensor | None = None) -> Tensor:
    """Counts of ``x`` in the bins given by ``edges``, with nothing dropped.

    Returns a float64 vector of length ``len(edges) + 2``:
    ``[below edges[0], bin 0, ..., bin B-1, above edges[-1], nonfinite]`` where bin i holds
    ``edges[i] <= v < edges[i+1]`` and the last bin also holds ``v == edges[-1]`` (NumPy's rule).
    A finite value equal to the largest float32 (3.4e38) is counted as non-finite.

    Args:
        x: the values (any shape and floating dtype).
        edges: the sorted bin edges.
        boundaries: :func:`bucket_boundaries` of ``edges`` on ``x``'s device, when the caller keeps
            them (the hot path does: building them per call would be a host-to-device copy).

    Example:
        >>> histogram_counts(torch.tensor([-5.0, 0.5, 1.0, float("nan")]), torch.tensor([0.0, 1.0])).tolist()
        [1.0, 2.0, 0.0, 1.0]
    """
    b = boundaries if boundaries is not None else bucket_boundaries(edges.to(x.device))
    v = _as_float(x).reshape(-1).float().nan_to_num(nan=math.inf, neginf=math.inf)  # non-finite -> last slot
    return slot_counts(torch.bucketize(v, b, right=True), b.numel() + 1)


def slot_counts(slots: Tensor, size: int) -> Tensor:
    """How many of ``slots`` (integers in ``[0, size)``) hold each value, as a float64 vector of ``size``.

    Example:
        >>> slot_counts(torch.tensor([0, 2, 2]), 4).tolist()
        [1.0, 0.0, 2.0, 0.0]
    """
    if reads_bounds(slots):  # a host tensor: bincount is fastest there
        return torch.bincount(slots, minlength=size).to(_WIDE)
    # CUDA's bincount reads its largest input back to size the output (a blocking sync per call, and
    # no deterministic kernel); the size is known, so scatter the ones instead (exact below 2**53)
    counts = torch.zeros(size, dtype=_WIDE, device=slots.device)
    return counts.scatter_add_(0, slots.long(), torch.ones(slots.numel(), dtype=_WIDE, device=slots.device))


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
        "act_rms": math.sqrt(mean * mean + std * std * (n - 1) / n),  # std is the sample (n - 1) one
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
