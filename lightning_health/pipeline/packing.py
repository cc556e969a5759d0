"""The layout of the one packed float64 vector a sampled step syncs and moves to the host.

Per layer, in order: activation totals, gradient totals, the two histograms (when kept), then per
call slot its fire mask, its per-unit ``|activation|`` sums and their count (dormancy, when
tracked) and its per-unit moments and their count (collapse, when tracked). :class:`LayerPlan`
records where each piece sits; :func:`pack_layer` appends one layer's pieces. Slots that did not
report this step pack zeros, so every rank packs the same layout.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from lightning_health.capture.hooks import Capture, StepBuffers
from lightning_health.readings import reductions as R


@dataclasses.dataclass
class LayerPlan:
    """Where one layer's numbers sit in the packed vector (and, after the sync, what its windows hold)."""

    base: int
    act_hist: tuple[int, int] | None = None
    grad_hist: tuple[int, int] | None = None
    slots: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # (slot, offset, width)
    windows: list[tuple[int, bool]] = dataclasses.field(default_factory=list)  # (width, window full)
    abs_slots: dict[int, int] = dataclasses.field(default_factory=dict)  # slot -> offset of sums (+ count)
    dormant: list[bool] = dataclasses.field(default_factory=list)  # per pushed AbsWindow: full
    alive_width: int = 0  # units of the slots that reported this step
    alive_slots: int = 0  # how many slots reported this step
    moment_slots: dict[int, int] = dataclasses.field(default_factory=dict)  # slot -> offset of moments (+ count)


@dataclasses.dataclass
class Packed:
    """The parts of the packed vector, and the indices of the fields reduced with min and max."""

    parts: list[Tensor] = dataclasses.field(default_factory=list)
    min_idx: list[int] = dataclasses.field(default_factory=list)
    max_idx: list[int] = dataclasses.field(default_factory=list)
    offset: int = 0

    def add(self, part: Tensor) -> int:
        """Append ``part``; its offset."""
        at = self.offset
        self.parts.append(part)
        self.offset += part.numel()
        return at


def zeros(n: int, device: torch.device) -> Tensor:
    return torch.zeros(n, dtype=torch.float64, device=device)


def _fill(value: float, device: torch.device) -> Tensor:
    return torch.full((1,), value, dtype=torch.float64, device=device)  # a fill on the device, no copy


def pack_layer(
    packed: Packed,
    buf: StepBuffers,
    masks: list[tuple[int, int, Tensor]],
    hist_lengths: tuple[int, int],
    track_abs: bool,
    track_moments: bool,
    device: torch.device,
) -> LayerPlan:
    """Append one layer's pieces to ``packed``; where they sit.

    Args:
        masks: ``(slot, width, float64 fire mask)`` per call slot to pack.
        hist_lengths: the lengths of the activation and gradient histograms (0: not kept).
    """
    entry = LayerPlan(base=packed.offset)
    act = buf.act if buf.act is not None else R.empty_activation_totals(device)
    grad = buf.grad if buf.grad is not None else R.empty_gradient_totals(device)
    packed.min_idx.append(entry.base + R.A_MIN)
    packed.max_idx += [entry.base + R.A_MAX, entry.base + R.ACTIVATION_WIDTH + R.G_ABSMAX]
    packed.add(act.to(device))
    packed.add(grad.to(device))
    hists = (("act_hist", buf.act_hist, hist_lengths[0]), ("grad_hist", buf.grad_hist, hist_lengths[1]))
    for attr, hist, length in hists:
        if length:
            at = packed.add(hist.to(device) if hist is not None else zeros(length, device))
            setattr(entry, attr, (at, length))
    for slot, width, vec in masks:
        entry.slots.append((slot, packed.add(vec), width))
        if track_abs:  # per-unit |activation| sums, then their count
            sums, count = buf.abs_sums.get(slot), float(buf.abs_counts.get(slot, 0))
            ok = sums is not None and sums.numel() == width
            entry.abs_slots[slot] = packed.add(sums.to(device) if ok else zeros(width, device))  # type: ignore[union-attr]
            packed.add(_fill(count, device))
        if track_moments:  # per-unit sums and sums of squares (zeros where the slot did not report), then their count
            moments, count = buf.moments.get(slot), float(buf.moment_counts.get(slot, 0))
            ok = moments is not None and moments.numel() == 2 * width
            entry.moment_slots[slot] = packed.add(moments.to(device) if ok else zeros(2 * width, device))  # type: ignore[union-attr]
            packed.add(_fill(count if ok else 0.0, device))
    return entry


def reported_flags(capture: Capture, device: torch.device) -> Tensor:
    """One float64 per layer: 1 where this rank read the layer since the last reset (summed across ranks)."""
    flags = zeros(len(capture.buffers), device)
    for index in capture.reported:
        flags[index] = 1.0  # a fill on the device, no host-to-device copy
    return flags
