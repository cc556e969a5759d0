"""What an activation can do, measured from what it computes (not from its class name).

At setup each selected activation is evaluated once, on the CPU, under ``no_grad``, on a copy in
eval mode (the user's module and its state are never touched), at the points of a fixed probe
grid: :data:`GRID` (``-20 .. 20`` in steps of 0.01, float64) and the far points ``+-1e2 .. 1e6``.
When it is *elementwise* (same output for a value whatever the tensor's shape and order), its
:class:`ActivationProfile` is derived from those numbers:

- **ends**: an end (``x -> -inf`` or ``+inf``) is *bounded* when the output stops moving between
  ``1e4`` and ``1e6``; its limit is the output at ``1e6``. The *bottom* end is the one with the
  lower limit (or the only bounded one when the other end rises without bound).
- **hard-zero side** (``can_die``): the bottom end outputs exactly ``0`` on a half-line
  (every probe point ``x <= -3``, see :data:`HARD_ZERO_FROM`). A unit living there gets no gradient and cannot recover:
  ReLU, ReLU6, Hardswish, Hardsigmoid. Only these layers get the ``dead`` rule.
- **smooth off side** (``off_side == "smooth"``): the bottom end is approached, not reached,
  and the activation is rectifier-shaped (the other end rises without bound, or it dips below
  its limit first): GELU, SiLU, Mish, Softplus, ELU, CELU, SELU. A unit there is *inactive*: it
  passes a small gradient and can come back (the ``inactive`` rule, a warning at most).
- **shoulders**: any other bounded end, approached monotonically (tanh's and sigmoid's both
  ends, hardtanh's, ReLU6's and Hardsigmoid's top, LogSigmoid's top at 0). An output there is
  *saturated* when the activation's slope there is below :data:`SATURATION_SLOPE` (20%) of its
  peak slope on the grid. For a shoulder approached monotonically that is an output threshold:
  ``y <= low`` or ``y >= high`` (:attr:`ActivationProfile.saturation`), so the on-device
  reduction stays one comparison. For a sigmoid, 20% of its peak slope (0.25) is reached at
  ``y = 0.053`` and ``0.947``: outputs at 0.01-0.04 (slope 6-25x below the peak, the top-layer
  saturation of Glorot & Bengio, 2010) read saturated. For tanh it is ``|y| >= 0.894``.

Anything that is not elementwise on the probe (GLU, Softmax, attention, blocks, modules that fail
on a 1-D input) or not finite on the grid gets :data:`NEUTRAL`: no bounds, cannot die, no off
side, nothing saturates. Recurrent layers are not probed: :func:`recurrent_profile` reads their
outputs as tanh (LSTM/GRU ``h``) or ReLU outputs (``nn.RNN(nonlinearity="relu")``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

SATURATION_SLOPE = 0.2
"""An output is saturated where the activation passes less than this fraction of its peak slope."""

GRID = torch.linspace(-20.0, 20.0, 4001, dtype=torch.float64)
FAR = torch.tensor([1e2, 1e3, 1e4, 1e6], dtype=torch.float64)
_MAX_PROBED_PARAMETERS = 1 << 16  # a module with more parameters than this is not an activation
OffSide = Literal["hard", "smooth"] | None


@dataclass(frozen=True)
class ActivationProfile:
    """What an activation's output means for the health readings (see the module docstring).

    Attributes:
        rectifier: the activation has an off side (hard or smooth) and a rising other side:
            ReLU, GELU, SiLU, ELU, ... (He initialisation fits it).
        bounds: ``(low, high)`` when both ends are bounded (the output range, for the
            histogram edges): tanh, sigmoid, hardtanh, ReLU6. ``None`` otherwise.
        off_side: ``"hard"`` (outputs exactly 0 with no gradient on a half-line: units can
            *die*), ``"smooth"`` (approaches its low limit with a gradient left: units go
            *inactive* but still learn) or ``None``.
        saturation: ``(low, high)``: an output ``<= low`` or ``>= high`` lies on a shoulder where
            the slope is below :data:`SATURATION_SLOPE` of its peak (``-inf``/``inf`` for a side
            without a shoulder). ``None``: nothing saturates.
        shoulders: ``(low, high)`` output limits of the shoulders, ``None`` for a side without.
        range: the output's limits at the two ends (``-inf``/``inf`` when unbounded; ``nan``
            when not probed).
        probed: False for the neutral profile (not elementwise, or not probeable).
    """

    rectifier: bool
    bounds: tuple[float, float] | None
    off_side: OffSide = None
    saturation: tuple[float, float] | None = None
    shoulders: tuple[float | None, float | None] = (None, None)
    range: tuple[float, float] = (math.nan, math.nan)
    probed: bool = False

    @property
    def can_die(self) -> bool:
        """True when units can die: a hard-zero side passes no gradient back."""
        return self.off_side == "hard"

    def saturation_thresholds(self, margin: float | None = None) -> tuple[float, float] | None:
        """The output thresholds of the saturation count.

        Args:
            margin: ``None``: from the slope (:attr:`saturation`). A fraction: the older band
                rule, outputs within ``margin`` of the output range from a shoulder's limit, for
                activations whose range is finite (others keep the slope thresholds).
        """
        if margin is None or self.bounds is None or self.saturation is None:
            return self.saturation
        width = self.bounds[1] - self.bounds[0]
        low, high = self.shoulders
        return (
            -math.inf if low is None else low + margin * width,
            math.inf if high is None else high - margin * width,
        )


NEUTRAL = ActivationProfile(rectifier=False, bounds=None)
"""Not elementwise or not probeable: no bounds, cannot die, no off side, nothing saturates."""


def _evaluate(fn: Callable[[Tensor], Any], x: Tensor) -> Tensor | None:
    try:
        y = fn(x.clone())
    except Exception:  # an activation that cannot take this input is not probeable
        return None
    if not isinstance(y, Tensor) or y.shape != x.shape or not y.is_floating_point():
        return None
    return y.detach().to(torch.float64)


def _elementwise(fn: Callable[[Tensor], Any], dtype: torch.dtype, on_grid: Tensor) -> bool:
    """Same values for the same inputs in another shape and order (Softmax, GLU, attention fail)."""
    idx = torch.arange(0, 4001, 67)[:60]
    z = GRID[idx].to(dtype).reshape(3, 4, 5)
    fz = _evaluate(fn, z)
    fp = _evaluate(fn, z.permute(2, 0, 1).contiguous())
    if fz is None or fp is None:
        return False
    same = torch.allclose(fz.reshape(-1), on_grid[idx], rtol=1e-5, atol=1e-6, equal_nan=True)
    return same and torch.allclose(fp, fz.permute(2, 0, 1), rtol=1e-5, atol=1e-6, equal_nan=True)


def _callable_of(module: nn.Module) -> tuple[Callable[[Tensor], Any], torch.dtype] | None:
    """An eval-mode copy's ``forward`` (hooks skipped) in float64, or float32 if that fails."""
    if sum(p.numel() for p in module.parameters()) > _MAX_PROBED_PARAMETERS or next(module.children(), None):
        return None
    try:
        twin = copy.deepcopy(module).to("cpu").eval()
    except Exception:
        return None
    for dtype in (torch.float64, torch.float32):
        try:
            twin = twin.to(dtype)
        except Exception:
            return None
        if _evaluate(twin.forward, GRID[:5].to(dtype)) is not None:
            return twin.forward, dtype
    return None


def probe_module(module: nn.Module) -> ActivationProfile:
    """The profile of ``module``'s activation from evaluating a copy on the probe grid (see module doc)."""
    found = _callable_of(module)
    if found is None:
        return NEUTRAL
    return probe(*found)


def probe(fn: Callable[[Tensor], Any], dtype: torch.dtype = torch.float64) -> ActivationProfile:
    """The profile of an elementwise function ``fn`` (a module's forward, ``torch.relu``, ...)."""
    with torch.no_grad():
        y = _evaluate(fn, GRID.to(dtype))
        if y is None or not bool(torch.isfinite(y).all()) or not _elementwise(fn, dtype, y):
            return NEUTRAL
        left, right = _evaluate(fn, -FAR.to(dtype)), _evaluate(fn, FAR.to(dtype))
        if left is None or right is None:
            return NEUTRAL
        return _derive(fn, dtype, y, left, right)


def _limit(far: Tensor) -> float | None:
    """The limit at one end from the far points (1e2..1e6 out), ``None`` when it keeps moving."""
    if not bool(torch.isfinite(far).all()):
        return None
    a, b = float(far[2]), float(far[3])
    return b if abs(b - a) <= 1e-3 * max(1.0, abs(a)) else None


def _derive(
    fn: Callable[[Tensor], Any], dtype: torch.dtype, y: Tensor, left: Tensor, right: Tensor
) -> ActivationProfile:
    step = float(GRID[1] - GRID[0])
    slope = (y[1:] - y[:-1]) / step
    peak = float(slope.abs().max())
    if peak == 0.0:
        return NEUTRAL
    lo, hi = _limit(left), _limit(right)
    # the sign of the unbounded side, from the far points: +1 rising without bound, -1 falling
    rising = {"left": float(left[3]) > float(y[0]), "right": float(right[3]) > float(y[-1])}
    ends: dict[str, float | None] = {"left": lo, "right": hi}
    if lo is not None and hi is not None:
        bottom = "left" if lo <= hi else "right"
    elif lo is not None:
        bottom = "left" if rising["right"] else "right"
    elif hi is not None:
        bottom = "right" if rising["left"] else "left"
    else:
        bottom = ""
    off_side: OffSide = None
    shoulder_sides: list[str] = []
    for side in ("left", "right"):
        limit = ends[side]
        if limit is None:
            continue
        if side == bottom and _hard_flat(y, left if side == "left" else right, side, 0.0):
            off_side = "hard"
        elif side == bottom and _rectifier_shaped(y, limit, ends, side) and not _hard_flat(y, None, side, None):
            off_side = "smooth"
        elif _monotone_end(slope, side):
            shoulder_sides.append(side)
    low_thr, high_thr = -math.inf, math.inf
    shoulders: list[float | None] = [None, None]
    for side in shoulder_sides:
        found = _threshold(fn, dtype, y, slope, peak, side)
        if found is None:
            continue
        if found[1]:
            low_thr, shoulders[0] = found[0], ends[side]
        else:
            high_thr, shoulders[1] = found[0], ends[side]
    saturation = None if (low_thr, high_thr) == (-math.inf, math.inf) else (low_thr, high_thr)
    finite = [v for v in (lo, hi) if v is not None]
    if lo is not None and hi is not None:
        out_range = (min(lo, hi, float(y.min())), max(lo, hi, float(y.max())))
    elif finite:
        unbounded_up = rising["right"] if hi is None else rising["left"]
        if unbounded_up:
            out_range = (min(finite[0], float(y.min())), math.inf)
        else:
            out_range = (-math.inf, max(finite[0], float(y.max())))
    else:
        out_range = (-math.inf, math.inf)
    bounds = out_range if all(math.isfinite(v) for v in out_range) else None
    return ActivationProfile(
        rectifier=off_side is not None,
        bounds=bounds,
        off_side=off_side,
        saturation=saturation,
        shoulders=(shoulders[0], shoulders[1]),
        range=out_range,
        probed=True,
    )


HARD_ZERO_FROM = 3.0
"""A hard-zero side outputs exactly 0 at every probe point ``x <= -3`` (ReLU, Hardswish, Hardsigmoid).

A smooth rectifier's tail only underflows to an exact 0 much further out (GELU near ``x = -8`` in
float64), where no unit of a trained layer lives."""


def _half_line(y: Tensor, side: str) -> Tensor:
    """The grid outputs at ``x <= -3`` (left) or ``x >= 3`` (right)."""
    return y[GRID <= -HARD_ZERO_FROM] if side == "left" else y[GRID >= HARD_ZERO_FROM]


def _hard_flat(y: Tensor, far: Tensor | None, side: str, value: float | None) -> bool:
    """Exactly constant on the half-line (and at the far points), at ``value`` when given."""
    part = _half_line(y, side)
    level = float(part[0]) if value is None else value
    flat = bool((part == level).all())
    return flat and (far is None or bool((far == level).all()))


def _rectifier_shaped(y: Tensor, limit: float, ends: dict[str, float | None], side: str) -> bool:
    """The bottom end is an off side: the other end rises without bound, or the output dips below the limit."""
    other = ends["right" if side == "left" else "left"]
    tol = 1e-6 * max(1.0, abs(limit))
    return other is None or float(y.min()) < limit - tol


def _monotone_end(slope: Tensor, side: str) -> bool:
    """The last stretch (|x| in 10..20) approaches the end without turning back (not an oscillation)."""
    part = slope[:1000] if side == "left" else slope[-1000:]
    return bool((part >= 0).all()) or bool((part <= 0).all())


def _threshold(
    fn: Callable[[Tensor], Any], dtype: torch.dtype, y: Tensor, slope: Tensor, peak: float, side: str
) -> tuple[float, bool] | None:
    """Where the slope falls below SATURATION_SLOPE * peak for good on one end, refined on a finer grid.

    Returns the output there and whether the shoulder is the low side of the outputs (``y <= t``)
    or the high side (``y >= t``); ``None`` when no output threshold separates the shoulder from
    the rest of the outputs (the shoulder's values also occur elsewhere).
    """
    steep = (slope.abs() >= SATURATION_SLOPE * peak).nonzero().flatten()
    if steep.numel() == 0:
        return None
    j = int(steep[-1]) if side == "right" else int(steep[0])  # the steep segment next to the shoulder
    a, b = float(GRID[max(j - 1, 0)]), float(GRID[min(j + 2, GRID.numel() - 1)])
    xs = torch.linspace(a, b, 3001, dtype=torch.float64)
    fine = _evaluate(fn, xs.to(dtype))
    if fine is None:
        return None
    fine_steep = ((fine[1:] - fine[:-1]).abs() / float(xs[1] - xs[0]) >= SATURATION_SLOPE * peak).nonzero().flatten()
    if fine_steep.numel() == 0:
        return None
    if side == "right":
        k = int(fine_steep[-1]) + 1
        shoulder, rest = torch.cat([fine[k:], y[b < GRID]]), torch.cat([y[a > GRID], fine[:k]])
    else:
        k = int(fine_steep[0])
        shoulder, rest = torch.cat([y[a > GRID], fine[: k + 1]]), torch.cat([fine[k + 1 :], y[b < GRID]])
    t = float(fine[k])
    limit = float(shoulder[-1] if side == "right" else shoulder[0])
    snapped = limit if abs(t - limit) <= 1e-9 * max(1.0, abs(limit)) else t  # a hard shoulder: its flat value
    if bool((shoulder <= t).all()) and bool((rest > t).all()):
        return snapped, True
    if bool((shoulder >= t).all()) and bool((rest < t).all()):
        return snapped, False
    return None


def recurrent_profile(module: nn.Module) -> ActivationProfile:
    """LSTM/GRU outputs ``h`` are tanh-bounded (read as tanh); ``nn.RNN`` as its nonlinearity; a projection: neutral."""
    if getattr(module, "proj_size", 0):
        return NEUTRAL
    if getattr(module, "nonlinearity", "tanh") == "relu":
        return function_profile(torch.relu)
    return function_profile(torch.tanh)


_FUNCTION_CACHE: dict[Any, ActivationProfile] = {}


def function_profile(fn: Callable[[Tensor], Tensor]) -> ActivationProfile:
    """The (cached) profile of a plain function such as ``torch.relu`` or ``F.gelu``."""
    if fn not in _FUNCTION_CACHE:
        _FUNCTION_CACHE[fn] = probe(fn)
    return _FUNCTION_CACHE[fn]
