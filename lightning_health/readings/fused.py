"""Activation and gradient totals in as few passes as the bounds allow, where the host reads values for free.

One ``aminmax`` pass comes first. Where reading a scalar costs nothing (a CPU tensor: no device to
wait for), its two values are read on the host and decide which other passes run at all:

- no NaN/Inf count unless the bounds are non-finite (then it is counted exactly);
- no saturation pass unless a bound reaches a saturation threshold, no zero count unless
  ``min <= 0 <= max``;
- the moments are one ``sum`` and one row-wise ``vector_norm`` (:func:`sum_of_squares`) over the
  tensor itself when the values straddle zero (or touch it) and their range is moderate, as for
  almost every activation (ReLU, GELU, tanh) and gradient: no temporary is written at all. Otherwise (every
  value on one side of zero, e.g. a sigmoid, or an extreme range) they run over ``(x - c) * s``
  in the reused buffer, as in :func:`lightning_health.readings.reductions.activation_totals`'s
  device path: ``c`` is the bound nearest zero, so nothing cancels and a collapsed layer keeps
  a precise std, and ``s`` is a power of two that keeps the float32 sum of squares finite.

Float32 passes (``sum`` is a cascade sum on a CPU), float64 combination on the host, one float64
vector per tensor built at the end. Counts are exact (float32 sums of 0/1 over at most
:data:`~lightning_health.readings.reductions.CHUNK` < 2**24 elements).

The passes that write (a comparison to count, a shifted copy) write into ``buf``, which may be
shorter than ``x``: they go through ``x`` one buffer-length at a time. A short buffer (2 MiB,
:data:`~lightning_health.readings.reductions.HOST_PASS`) costs no time on a CPU, where what it
holds is read back while still in cache, and keeps a sampled step's extra memory small (it lives
through the backward pass, where a CNN's memory peaks).

On an accelerator a scalar read would block the host on every layer, so tensors there take the
device path (every pass, branch-free) instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

_WIDE = torch.float64
# Ranges within which float32 sums of squares neither overflow (2**21 values of 2**40 squared) nor
# lose small values to subnormals: no scaling needed.
_SMALLEST_RANGE = 2.0**-40
_LARGEST_RANGE = 2.0**40
# Values per float32 partial sum of squares. One ``vector_norm`` over a whole chunk accumulates
# sequentially in vector lanes and drifts by up to 3e-4 relative on 2**21 values; per-row norms of
# 1024 values, widened and summed in float64, stay within ~1e-8 at the same speed.
_ROW = 1024


def row_squares(x: Tensor) -> Tensor:
    """Float64 sum of squares of ``x`` (any shape) as a 0-d tensor on its device: norms of rows of
    :data:`_ROW` values, accumulated in float32 (float64 for float64 ``x``), combined in float64."""
    flat = x.reshape(-1)
    n = flat.numel()
    acc = _WIDE if flat.dtype == _WIDE else torch.float32
    if n <= _ROW:  # one row
        return torch.linalg.vector_norm(flat, dtype=acc).to(_WIDE).square_()
    body = n - n % _ROW
    rows = (flat if body == n else flat[:body]).view(-1, _ROW)
    total = torch.linalg.vector_norm(rows, dim=1, dtype=acc).to(_WIDE).square_().sum()
    if body < n:
        total += torch.linalg.vector_norm(flat[body:], dtype=acc).to(_WIDE).square()
    return total


def sum_of_squares(x: Tensor) -> float:
    """:func:`row_squares` of flat ``x``, read on the host."""
    return float(row_squares(x))


def moments(x: Tensor, lo: float, hi: float, buf: Tensor) -> tuple[float, float]:
    """Float64 ``(sum, sum of squares)`` of flat float32/float64 ``x`` whose bounds are ``lo``, ``hi``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN or Inf: the moments read NaN or Inf anyway
        return float(x.sum()), sum_of_squares(x)
    centre = lo if lo > 0 else (hi if hi < 0 else 0.0)
    reach = hi - lo
    if centre == 0.0 and _SMALLEST_RANGE <= max(reach, abs(lo), abs(hi)) <= _LARGEST_RANGE:
        return float(x.sum()), sum_of_squares(x)
    scale = 1.0
    if not _SMALLEST_RANGE <= reach <= _LARGEST_RANGE:
        scale = math.ldexp(1.0, min(-math.frexp(reach)[1], 126)) if reach > 0 else 1.0
    s1 = s2 = 0.0
    for part, out in _pieces(x, buf):
        torch.sub(part, centre, out=out)
        if scale != 1.0:
            out.mul_(scale)
        s1 += float(out.sum())
        s2 += sum_of_squares(out)
    s1, s2 = s1 / scale, s2 / scale / scale
    n = x.numel()
    return s1 + n * centre, s2 + centre * (2 * s1 + n * centre)


def chunks(x: Tensor, size: int) -> Sequence[Tensor]:
    """``x`` in pieces of at most ``size`` along its first axis (values, when flat): itself when it
    fits (``split`` costs a few microseconds of Python per call, paid per layer and per pass on every
    sampled step)."""
    return (x,) if x.shape[0] <= size else x.split(size)


def _pieces(x: Tensor, buf: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``x`` in pieces of ``buf``'s length, each with the part of ``buf`` it may write."""
    return [(part, buf[: part.numel()]) for part in chunks(x, buf.numel())]


def count(x: Tensor, buf: Tensor, mark: Callable[[Tensor, Tensor], Tensor]) -> float:
    """How many of ``x`` ``mark`` flags: ``mark(part, out)`` writes 1.0/0.0 for ``part`` into ``out``
    and returns it (float sums of 0/1 over at most 2**24 values each, exact)."""
    return sum(float(mark(part, out).sum()) for part, out in _pieces(x, buf))


def nonfinite(x: Tensor, lo: float, hi: float, buf: Tensor) -> float:
    """How many of ``x`` are NaN or +-Inf; no pass when both bounds are finite (``aminmax`` propagates NaN)."""
    if math.isfinite(lo) and math.isfinite(hi):
        return 0.0
    return count(x, buf, lambda part, out: torch.mul(part, 0.0, out=out).ne_(0.0))  # x * 0: 0 if finite, else NaN


def zeros(x: Tensor, lo: float, hi: float, buf: Tensor) -> float:
    """How many of ``x`` are exactly 0; no pass when the bounds exclude it."""
    if lo > 0 or hi < 0:
        return 0.0
    return count(x, buf, lambda part, out: torch.eq(part, 0.0, out=out))


def beyond(x: Tensor, thresholds: tuple[float, float] | None, lo: float, hi: float, buf: Tensor) -> float:
    """How many of ``x`` are ``<= low`` or ``>= high``; no pass when the bounds reach neither."""
    if thresholds is None:
        return 0.0
    low, high = thresholds
    reaches_low, reaches_high = not lo > low, not hi < high  # NaN bounds reach both
    if not (reaches_low or reaches_high):
        return 0.0
    if reaches_low and reaches_high and math.isfinite(low) and math.isfinite(high):
        middle, half = (low + high) / 2, (high - low) / 2
        return count(x, buf, lambda part, out: torch.sub(part, middle, out=out).abs_().ge_(half))
    total = 0.0
    if reaches_low and math.isfinite(low):
        total += count(x, buf, lambda part, out: torch.le(part, low, out=out))
    if reaches_high and math.isfinite(high):
        total += count(x, buf, lambda part, out: torch.ge(part, high, out=out))
    return total


def activation_floats(
    x: Tensor, thresholds: tuple[float, float] | None, buf: Tensor, with_moments: bool = True
) -> list[float]:
    """``[count, sum, sum_sq, min, max, zeros, saturated, nonfinite]`` of flat, non-empty ``x`` (one chunk).

    ``with_moments=False``: the caller has the moments (see :func:`take_moments`); they are left
    NaN here unless ``x`` holds NaN/Inf, where they are computed (the caller's are not used then).
    """
    lo_t, hi_t = torch.aminmax(x)
    lo, hi = lo_t.item(), hi_t.item()
    finite = math.isfinite(lo) and math.isfinite(hi)
    total, total_sq = moments(x, lo, hi, buf) if with_moments or not finite else (math.nan, math.nan)
    return [
        float(x.numel()),
        total,
        total_sq,
        lo,
        hi,
        zeros(x, lo, hi, buf),
        beyond(x, thresholds, lo, hi, buf),
        nonfinite(x, lo, hi, buf),
    ]


def take_moments(totals: list[float], given: Tensor, fields: tuple[int, int, int, int]) -> None:
    """Put the caller's ``[sum, sum of squares]`` into ``totals`` (fields: sum, sum_sq, min, max)
    when the bounds are finite, i.e. when :func:`activation_floats` left them out."""
    total, total_sq, lo, hi = fields
    if math.isfinite(totals[lo]) and math.isfinite(totals[hi]):
        totals[total], totals[total_sq] = given.tolist()


def gradient_floats(x: Tensor, buf: Tensor) -> list[float]:
    """``[count, sum, sum_sq, max_abs, nonfinite]`` of flat, non-empty ``x`` (one chunk)."""
    lo_t, hi_t = torch.aminmax(x)
    lo, hi = lo_t.item(), hi_t.item()
    total, total_sq = moments(x, lo, hi, buf)
    max_abs = math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)
    return [float(x.numel()), total, total_sq, max_abs, nonfinite(x, lo, hi, buf)]


def nan_wins(fold: Callable[[list[float]], float], values: list[float]) -> float:
    """``fold(values)`` (``min`` or ``max``), NaN when one is NaN: Python's own would depend on where it stands.

    Example:
        >>> nan_wins(min, [2.0, 1.0]), nan_wins(max, [1.0, math.nan])
        (1.0, nan)
    """
    return math.nan if any(math.isnan(v) for v in values) else fold(values)


def combine(parts: list[list[float]], mins: tuple[int, ...], maxes: tuple[int, ...]) -> list[float]:
    """Totals of the union of several chunks' float totals: sums add, ``mins``/``maxes`` combine (NaN wins)."""
    out = [math.fsum(column) for column in zip(*parts)]
    for i in mins + maxes:
        out[i] = nan_wins(min if i in mins else max, [p[i] for p in parts])
    return out


def to_device(values: list[float], device: torch.device) -> Tensor:
    """The float64 totals vector (a CPU tensor: built from the host floats with no transfer)."""
    return torch.tensor(values, dtype=_WIDE, device=device)
