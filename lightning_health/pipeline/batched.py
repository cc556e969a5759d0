"""Per-layer counts after the sync, computed for every layer at once instead of a few small ops per layer.

A deep net's sampled step paid ~1 ms per monitored layer at the step end whatever the layer's
size (issue 17.6): each layer summed its dead mask, its fired mask and its collapse reading with
a handful of tiny device ops. Here the per-layer pieces are concatenated once and reduced by
segment (``index_add_``) with an index built once per layout and kept on the device (building it
is a host-to-device copy, so it is not rebuilt per step). Gathers are ``index_select``: on a CPU
advanced indexing with the same index costs about twice as much.
"""

from __future__ import annotations

import torch
from torch import Tensor

_WIDE = torch.float64


class SegmentSums:
    """Sums of a list of vectors, each as one float64 element, in three ops whatever their number."""

    def __init__(self) -> None:
        self._index: tuple[tuple[int, ...], Tensor] | None = None

    def __call__(self, parts: list[Tensor], device: torch.device) -> Tensor:
        if not parts:
            return torch.zeros(0, dtype=_WIDE, device=device)
        key = tuple(p.numel() for p in parts)
        if self._index is None or self._index[0] != key or self._index[1].device != device:
            owners = [i for i, n in enumerate(key) for _ in range(n)]
            self._index = (key, torch.tensor(owners, dtype=torch.long, device=device))
        flat = torch.cat(parts).to(_WIDE)
        return torch.zeros(len(key), dtype=_WIDE, device=device).index_add_(0, self._index[1], flat)


class CollapseCounts:
    """``[collapsed units, live units measured]`` per layer from the synced per-unit moments of all its slots.

    The same numbers as :func:`lightning_health.readings.collapse.collapsed_units` summed over each
    layer's slots, in a fixed number of ops for all layers together.
    """

    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None
        self._idx: dict[str, Tensor] = {}

    def _build(self, spans: list[list[tuple[int, int]]], device: torch.device) -> None:
        """``spans``: per layer, ``(offset, width)`` of each slot's ``[sums, squares, count]`` block."""
        sums: list[int] = []
        squares: list[int] = []
        unit_slot: list[int] = []
        counts: list[int] = []
        widths: list[float] = []
        slot_layer: list[int] = []
        for layer, slots in enumerate(spans):
            for at, width in slots:
                slot = len(counts)
                sums += range(at, at + width)
                squares += range(at + width, at + 2 * width)
                unit_slot += [slot] * width
                counts.append(at + 2 * width)
                widths.append(float(width))
                slot_layer.append(layer)
        as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        self._idx = {
            "sums": as_long(sums),
            "squares": as_long(squares),
            "unit_slot": as_long(unit_slot),
            "counts": as_long(counts),
            "slot_layer": as_long(slot_layer),
            "widths": torch.tensor(widths, dtype=_WIDE, device=device),
        }

    def __call__(self, synced: Tensor, spans: list[list[tuple[int, int]]], ratio: float) -> Tensor:
        """A ``(layers, 2)`` float64 tensor on ``synced``'s device, one row per entry of ``spans``."""
        key = (tuple(tuple(s) for s in spans), synced.device)
        if key != self._key:
            self._build(spans, synced.device)
            self._key = key
        idx = self._idx
        n_slots = idx["counts"].numel()
        sums, squares = synced.index_select(0, idx["sums"]), synced.index_select(0, idx["squares"])
        n = synced.index_select(0, idx["counts"])
        measured = (n >= 2).to(_WIDE)
        n_safe = n.clamp(min=1)
        n_unit = n_safe.index_select(0, idx["unit_slot"])
        mean = sums / n_unit
        var = (squares / n_unit - mean * mean).clamp_(min=0)
        slot_squares = torch.zeros(n_slots, dtype=_WIDE, device=synced.device).index_add_(0, idx["unit_slot"], squares)
        mean_square = (slot_squares / (n_safe * idx["widths"].clamp(min=1))).index_select(0, idx["unit_slot"])
        live = ~(squares <= 0)  # exactly 0 everywhere is dead's business, not collapse's (NaN stays: it is reported)
        constant = (live & (var <= (ratio * ratio) * mean_square)).to(_WIDE)
        slots = torch.zeros(2, n_slots, dtype=_WIDE, device=synced.device)
        per_slot = slots[0].index_add_(0, idx["unit_slot"], constant)
        live_slot = slots[1].index_add_(0, idx["unit_slot"], live.to(_WIDE))
        share_of = torch.where(live_slot > 0, live_slot, idx["widths"])  # no live unit: 0 of all, as before
        rows = torch.stack([per_slot * measured, measured * share_of], dim=1)
        out = torch.zeros(len(spans), 2, dtype=_WIDE, device=synced.device)
        return out.index_add_(0, idx["slot_layer"], rows)


class DormantCounts:
    """How many units of each dormancy window are tau-dormant, for all windows at once.

    The same numbers as ``dormant_mask(window.sums.sum(0), window.counts.sum(), tau).sum()`` per
    window (:func:`lightning_health.readings.dormancy.dormant_scores` has the rules: a unit with a
    non-finite mean scores NaN and is left out of its layer's average; a silent layer scores 0).
    """

    def __init__(self) -> None:
        self._index: tuple[tuple[int, ...], Tensor] | None = None

    def __call__(self, windows: list[tuple[Tensor, Tensor]], tau: float, device: torch.device) -> Tensor:
        """``windows``: per window, its ``(size, units)`` sums and ``(size,)`` counts; a float64 count per window."""
        if not windows:
            return torch.zeros(0, dtype=_WIDE, device=device)
        key = tuple(sums.shape[1] for sums, _counts in windows)
        if self._index is None or self._index[0] != key or self._index[1].device != device:
            owners = [i for i, n in enumerate(key) for _ in range(n)]
            self._index = (key, torch.tensor(owners, dtype=torch.long, device=device))
        unit_slot = self._index[1]
        sums = torch.cat([s for s, _c in windows], dim=1).sum(dim=0).to(_WIDE)
        counts = torch.stack([c for _s, c in windows]).sum(dim=1).to(_WIDE)
        means = sums / counts.index_select(0, unit_slot)
        finite = torch.isfinite(means)
        safe = torch.where(finite, means, torch.zeros_like(means))
        n_finite = torch.zeros(len(key), dtype=_WIDE, device=device).index_add_(0, unit_slot, finite.to(_WIDE))
        total = torch.zeros(len(key), dtype=_WIDE, device=device).index_add_(0, unit_slot, safe)
        layer_mean = (total / n_finite.clamp(min=1)).index_select(0, unit_slot)
        scores = torch.where(layer_mean > 0, means / layer_mean, torch.zeros_like(means))
        dormant = (finite & (scores <= tau)).to(_WIDE)  # a NaN score is never dormant
        return torch.zeros(len(key), dtype=_WIDE, device=device).index_add_(0, unit_slot, dormant)
