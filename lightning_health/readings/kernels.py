"""The activation and gradient totals as single fused kernels (``torch.compile``), opt-in and experimental.

The idea: compiled, the readings become one loop that reads each value once and keeps every
accumulator in registers. Measured on a CPU (``python -m benchmarks.micro --compiled``), it does
not pay: inductor's CPU code for the float64 accumulators is not vectorised, and these kernels
run slower than the eager reductions, whose float32 passes use the CPU's fastest kernels (a
float32-accumulating variant was 2-4x faster than eager on large tensors but lost ~1e-4 relative
precision, and was not adopted). Compilation happens once per dtype and kind of activation
(seconds on a CPU, cached on disk by inductor). Not measured on a GPU. Off by default
(``HealthMonitor(compile_reductions=True)`` turns it on).

The results equal :func:`lightning_health.readings.reductions.activation_totals` and
:func:`~lightning_health.readings.reductions.gradient_totals` (same layout, float64 accumulation).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_health.readings import reductions as R

_WIDE = torch.float64


def _activation_totals(x: Tensor, thresholds: Tensor) -> Tensor:
    """``thresholds = [low + band, high - band]``; NaN thresholds mean "nothing saturates"."""
    v = x.reshape(-1).to(_WIDE)
    n = torch.ones_like(v).sum()
    saturated = ((v <= thresholds[0]) | (v >= thresholds[1])).to(_WIDE).sum()
    return torch.stack(
        [
            n,
            v.sum(),
            (v * v).sum(),
            v.amin(),
            v.amax(),
            (v == 0).to(_WIDE).sum(),
            saturated,
            (~torch.isfinite(v)).to(_WIDE).sum(),
        ]
    )


def _gradient_totals(x: Tensor) -> Tensor:
    v = x.reshape(-1).to(_WIDE)
    return torch.stack(
        [
            torch.ones_like(v).sum(),
            v.sum(),
            (v * v).sum(),
            v.abs().amax(),
            (~torch.isfinite(v)).to(_WIDE).sum(),
        ]
    )


@functools.lru_cache(maxsize=1)
def compiled() -> tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """The two compiled functions (compiled lazily on first call, dynamic in shape)."""
    return (
        torch.compile(_activation_totals, dynamic=True, fullgraph=True),
        torch.compile(_gradient_totals, dynamic=True, fullgraph=True),
    )


def saturation_thresholds(bounds: tuple[float, float] | None, margin: float, device: torch.device) -> Tensor:
    """The two thresholds :func:`_activation_totals` compares against, as a device tensor."""
    if bounds is None:
        return torch.full((2,), float("nan"), dtype=_WIDE, device=device)
    low, high = bounds
    band = margin * (high - low)
    out = torch.empty(2, dtype=_WIDE, device=device)
    out[0], out[1] = low + band, high - band
    return out


def threshold_vector(thresholds: tuple[float, float] | None, device: torch.device) -> Tensor:
    """``(low, high)`` output thresholds (``y <= low`` or ``y >= high`` is saturated) as the device tensor
    :func:`activation_totals` takes; ``None``: nothing saturates."""
    out = torch.full((2,), float("nan"), dtype=_WIDE, device=device)
    if thresholds is not None:
        out[0], out[1] = thresholds
    return out


def activation_totals(y: Tensor, thresholds: Tensor) -> Tensor:
    """Fused equivalent of :func:`lightning_health.readings.reductions.activation_totals`."""
    x = y.detach()
    if x.numel() == 0:
        return R.empty_activation_totals(x.device)
    return compiled()[0](x, thresholds.to(x.device))


def gradient_totals(g: Tensor) -> Tensor:
    """Fused equivalent of :func:`lightning_health.readings.reductions.gradient_totals`."""
    x = g.detach()
    if x.numel() == 0:
        return R.empty_gradient_totals(x.device)
    return compiled()[1](x)
