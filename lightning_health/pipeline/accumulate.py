"""The step-end pipeline: pack every layer's buffers, sync across ranks once, window, transfer once.

This module owns :class:`Accumulator` (the per-layer state across sampled steps, the DDP layout
agreement and the order of the steps); the pieces live next to it: the packed layout in
:mod:`~lightning_health.pipeline.packing`, the evidence windows in
:mod:`~lightning_health.pipeline.windows`, the per-layer counts for all layers at once in
:mod:`~lightning_health.pipeline.batched`, the host list turned into readings in
:mod:`~lightning_health.pipeline.unpack`, parameter gradient norms in
:mod:`~lightning_health.pipeline.param_grads`.

A sampled step ends here. Every layer's raw totals, histogram counts and per-unit fire masks are
packed into one float64 vector, reduced across ranks by :mod:`lightning_health.pipeline.sync` (one
sum and one max all-reduce, whose payload does not grow with the world size), pushed into the rolling
dead-unit windows on the device, and moved to the host with one ``.tolist()``.

With ``tau`` set, each layer call slot also packs its per-unit sums of ``|activation|`` and their
count (summed across ranks like every other total) into an :class:`AbsWindow`, from which the
tau-dormant units are counted on the device (:mod:`lightning_health.readings.dormancy`). Every layer also
keeps, per unit, the last sampled step at which it fired, from the synced fire masks. Windows and
steps are built from synced numbers only, so the masks they give are identical on every rank.

Dead units: a unit is dead when it never fired (output > 0) on any example of any sampled batch in
the window, i.e. the last ``window`` sampled batches. The dead fraction of a layer is reported only
once its window is full, because one batch is never enough evidence.

Layout agreement (DDP): all ranks must pack vectors of the same layout, but a fire mask's width is
only known once a rank has run the layer, and one rank may never run a layer another one runs
(a zero-size batch still runs it; a data-dependent branch may not). So in distributed runs only
the (layer, call slot) masks every rank has agreed on are packed, plus one flag element that says
"some rank has seen a slot outside the agreed layout". When the synced flag is set, which every
rank sees at the same step, the ranks merge their layouts (two fixed-size max all-reduces, see
:func:`lightning_health.pipeline.sync.agree_layout`) and pack and sync again; nothing is lost. This
happens on the first sampled step and whenever a new slot first appears; every other sampled step
costs exactly the two all-reduces of the sync, plus a one-element host read of the flag.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_health.capture.hooks import Capture, StepBuffers
from lightning_health.pipeline.batched import CollapseCounts, DormantCounts, SegmentSums
from lightning_health.pipeline.host_copy import HostCopy, Pending
from lightning_health.pipeline.packing import LayerPlan, Packed, pack_layer, reported_flags, zeros
from lightning_health.pipeline.sync import agree_layout, sync_vector, world_size
from lightning_health.pipeline.unpack import LayerReading, to_readings
from lightning_health.pipeline.windows import AbsWindow, UnitWindow
from lightning_health.readings.dormancy import update_last_fired

__all__ = ["Accumulator", "LayerReading"]

_NO_INDEX = torch.zeros(0, dtype=torch.long)


class Accumulator:
    """Per-layer state across sampled steps: the dead-unit windows, and the step-end pipeline."""

    def __init__(
        self, capture: Capture, window: int, tau: float | None = None, collapse_ratio: float | None = 1e-3
    ) -> None:
        self.capture = capture
        self.window = window
        self.windows: dict[tuple[int, int], UnitWindow] = {}
        self.widths: dict[tuple[int, int], int] = {}  # (layer, slot) -> units, remembered across steps
        self.tau = tau  # dormancy threshold; None: no |activation| sums are taken or packed
        self.abs_windows: dict[tuple[int, int], AbsWindow] = {}
        self.last_fired: dict[int, Tensor] = {}  # layer -> int64 per unit, the last step it fired (-1: never)
        capture.track_abs = tau is not None
        self.collapse_ratio = collapse_ratio  # per-unit std vs layer RMS; None: no per-unit moments
        capture.track_moments = collapse_ratio is not None
        self._index_cache: tuple[tuple[object, ...], Tensor, Tensor] | None = None
        self._dead_sums, self._alive_sums, self._dormant = SegmentSums(), SegmentSums(), DormantCounts()
        self._collapse = CollapseCounts()
        self._pinned: dict[str, Tensor] = {}  # CUDA: the reused pinned host buffer of the step's one copy
        self.agreed: dict[tuple[int, int], int] = {}  # DDP: the (layer, slot) -> units every rank packs

    def device(self) -> torch.device:
        for buf in self.capture.buffers:
            for t in (buf.act, buf.grad, *buf.fired.values()):
                if t is not None:
                    return t.device
        for layer in self.capture.layers:
            for p in layer.module.parameters():
                return p.device
        return torch.device("cpu")

    def _slots(self, index: int, buf: StepBuffers) -> list[int]:
        for slot, mask in buf.fired.items():
            self.widths[(index, slot)] = mask.numel()
        return sorted(slot for (i, slot) in self.widths if i == index)

    def _packed_slots(self, index: int, buf: StepBuffers, distributed: bool) -> list[tuple[int, int]]:
        """``(slot, width)`` of the masks to pack: every known slot, or in DDP only the agreed ones."""
        local = self._slots(index, buf)
        if not distributed:
            return [(slot, self.widths[(index, slot)]) for slot in local]
        return sorted((slot, width) for (i, slot), width in self.agreed.items() if i == index)

    def _layout_flag(self, device: torch.device) -> Tensor:
        """One element, 1 when this rank knows a (layer, slot) outside the agreed layout."""
        new = any(key not in self.agreed for key in self.widths)
        return torch.full((1,), float(new), dtype=torch.float64, device=device)

    def _agree_layout(self) -> None:
        """Every rank: merge all ranks' ``(layer, slot) -> width`` into the agreed layout."""
        merged = agree_layout(self.widths, len(self.capture.buffers), self.device())
        for key, width in merged.items():
            self.agreed[key] = max(self.agreed.get(key, 0), width)
        self.widths.update(self.agreed)  # a slot this rank never ran is now known here too

    def _pack_masks(
        self, index: int, buf: StepBuffers, distributed: bool, device: torch.device
    ) -> list[tuple[int, int, Tensor]]:
        """``(slot, width, float64 mask)`` to pack for one layer (zeros where the slot did not run)."""
        out = []
        for slot, width in self._packed_slots(index, buf, distributed):
            mask = buf.fired.get(slot)
            if mask is None:
                out.append((slot, width, zeros(width, device)))
                continue
            vec = mask.to(device=device, dtype=torch.float64).reshape(-1)
            if vec.numel() != width:  # DDP: ranks disagreed on the width; pad/cut to the agreed one
                vec = torch.cat([vec, zeros(width, device)])[:width]
            out.append((slot, width, vec))
        return out

    def _sync_agreed(
        self, pack: Callable[[], tuple[list[Tensor], list[int], list[int]]], device: torch.device
    ) -> Tensor:
        """Pack, then reduce across ranks: the one place that keeps DDP layouts in agreement.

        ``pack`` returns the parts and the indices to reduce with min and max. Under DDP a
        one-element flag rides at the end ("this rank knows a (layer, slot) outside the agreed
        layout"); when any rank raised it, every rank agrees a new layout and packs again.
        """
        distributed = world_size() > 1
        while True:
            parts, min_idx, max_idx = pack()
            if distributed:
                parts.append(self._layout_flag(device))
            packed = torch.cat(parts) if parts else zeros(0, device)
            synced = sync_vector(packed, *self._reduction_indices(min_idx, max_idx, device))
            if not distributed or synced[-1].item() == 0:  # the layout flag (DDP only)
                return synced
            self._agree_layout()  # every rank saw the flag: agree, then pack and sync again

    def finish_train_step(
        self, extra: Tensor | None = None, shared_max: Tensor | None = None, step: int | None = None
    ) -> tuple[list[LayerReading], list[float], list[float]]:
        """End a sampled training step: pack, sync, window, transfer once (:meth:`launch_train_step`, read at once)."""
        return self.launch_train_step(extra, shared_max, step, defer=False).land()

    def launch_train_step(
        self,
        extra: Tensor | None = None,
        shared_max: Tensor | None = None,
        step: int | None = None,
        defer: bool | None = None,
        shared_sum: Tensor | None = None,
    ) -> Pending[tuple[list[LayerReading], list[float], list[float]]]:
        """End a sampled training step on the device: pack, sync, window, start the one host copy.

        Args:
            extra: a float64 device vector appended after sync (already identical on every rank,
                e.g. parameter gradient norms) so it rides on the same host transfer.
            shared_max: per-rank numbers to reduce with ``max`` in the same collective (e.g. step
                timings), so every rank takes the same decisions from them.
            step: the global step, recorded in :attr:`last_fired` (not recorded when ``None``).

            defer: read the host copy later (see :class:`~lightning_health.pipeline.host_copy.HostCopy`).
            shared_sum: per-rank numbers to sum in the same collective (e.g. attention entropy sums),
                packed before ``shared_max``.

        Returns:
            A :class:`~lightning_health.pipeline.host_copy.Pending`: its ``land()`` gives one
            :class:`LayerReading` per monitored layer, and the host copies of ``extra`` and of the
            synced ``shared_sum`` followed by ``shared_max``.
        """
        device = self.device()
        distributed = world_size() > 1
        plan: list[LayerPlan] = []
        shared_at = 0

        def pack() -> tuple[list[Tensor], list[int], list[int]]:
            nonlocal plan, shared_at
            plan, packed = self._pack_train(distributed, device)
            shared_at = packed.offset
            if shared_sum is not None:  # no min/max index: summed like the totals
                packed.add(shared_sum.to(device=device, dtype=torch.float64))
            if shared_max is not None:
                packed.max_idx += range(packed.offset, packed.offset + shared_max.numel())
                packed.add(shared_max.to(device=device, dtype=torch.float64))
            return packed.parts, packed.min_idx, packed.max_idx

        synced = self._sync_agreed(pack, device)
        counts, sizes = self._unit_counts(synced, plan, distributed, step)
        tail = [synced, *counts]
        if extra is not None:
            tail.append(extra.to(device=device, dtype=torch.float64))
        copy = HostCopy(torch.cat(tail), self._pinned, defer)  # the one device-to-host transfer of the step
        collapse, width, has_extra = self.collapse_ratio is not None, synced.numel(), extra is not None

        def land() -> tuple[list[LayerReading], list[float], list[float]]:
            host = copy.values()
            readings, cursor = to_readings(host, plan, width, sizes, collapse)
            shared = host[shared_at : width - (1 if distributed else 0)]  # not the layout flag
            return readings, (host[cursor:] if has_extra else []), shared

        return Pending(copy, land)

    def _pack_train(self, distributed: bool, device: torch.device) -> tuple[list[LayerPlan], Packed]:
        """Every layer's totals, histograms, masks and per-unit sums, in the packed layout."""
        self.capture.bin_histograms()
        packed = Packed()
        plan = []
        hist = self._grad_hist_len()
        for index, buf in enumerate(self.capture.buffers):
            masks = self._pack_masks(index, buf, distributed, device)
            lengths = (self._act_hist_len(index), hist)
            track = (self.tau is not None, self.collapse_ratio is not None)
            plan.append(pack_layer(packed, buf, masks, lengths, *track, device))
        return plan, packed

    def _unit_counts(
        self, synced: Tensor, plan: list[LayerPlan], distributed: bool, step: int | None
    ) -> tuple[list[Tensor], tuple[int, int, int]]:
        """Push the synced masks and sums into the windows; the count blocks (device) and their sizes."""
        dead: list[Tensor] = []
        dormant: list[tuple[Tensor, Tensor]] = []
        fired_all: list[Tensor] = []
        for index, entry in enumerate(plan):
            fired_now: list[Tensor] = []
            for slot, start, width in entry.slots:
                win = self.windows.setdefault((index, slot), UnitWindow(self.window))
                reported = distributed or self.capture.buffers[index].fired.get(slot) is not None
                if reported:
                    fired = synced[start : start + width] > 0
                    win.push(fired)
                    fired_now.append(fired)
                    entry.alive_width += width
                if win.ring is not None:
                    dead.append(win.dead())
                    entry.windows.append((width, win.full))
                if slot in entry.abs_slots and self.tau is not None:
                    awin = self.abs_windows.setdefault((index, slot), AbsWindow(self.window))
                    at = entry.abs_slots[slot]
                    if reported:
                        awin.push(synced[at : at + width], synced[at + width])
                    if awin.sums is not None and awin.counts is not None:
                        dormant.append((awin.sums, awin.counts))
                        entry.dormant.append(awin.full)
            entry.alive_slots = len(fired_now)
            fired_all += fired_now
            if fired_now:
                self._record_fired(index, fired_now, step)
        device = synced.device
        blocks = [
            self._dead_sums(dead, device),
            self._dormant(dormant, self.tau if self.tau is not None else 0.0, device),
            self._alive_sums(fired_all, device),
        ]
        if self.collapse_ratio is not None:
            spans = [[(at, width) for _slot, at, width in _moment_spans(e)] for e in plan if e.moment_slots]
            if spans:
                blocks.append(self._collapse(synced, spans, self.collapse_ratio).reshape(-1))
        return blocks, (len(dead), len(dormant), len(fired_all))

    def _reduction_indices(self, min_idx: list[int], max_idx: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
        """Index tensors for the min/max fields, built once per layout and only when ranks are synced.

        Building them from Python lists is a host-to-device copy, which on a GPU blocks the host:
        outside DDP they are never needed, under DDP they are cached.
        """
        if world_size() == 1:
            return _NO_INDEX, _NO_INDEX
        key = (tuple(min_idx), tuple(max_idx), str(device))
        if self._index_cache is None or self._index_cache[0] != key:
            as_tensor = lambda idx: torch.tensor(idx, dtype=torch.long, device=device)  # noqa: E731
            self._index_cache = (key, as_tensor(min_idx), as_tensor(max_idx))
        return self._index_cache[1], self._index_cache[2]

    def _record_fired(self, index: int, fired: list[Tensor], step: int | None) -> None:
        """OR the synced fire masks of the layer's calls (of the first call's width) into ``last_fired``."""
        if step is None:
            return
        width = fired[0].numel()
        any_fired = fired[0]
        for mask in fired[1:]:
            if mask.numel() == width:
                any_fired = any_fired | mask
        last = self.last_fired.get(index)
        if last is None or last.numel() != width or last.device != any_fired.device:
            last = torch.full((width,), -1, dtype=torch.int64, device=any_fired.device)
        self.last_fired[index] = update_last_fired(last, any_fired, step)

    def calls_per_step(self, index: int) -> int:
        """How many forward calls (slots) of layer ``index`` have been seen in one batch."""
        return sum(1 for (i, _slot) in self.widths if i == index)

    def rescue_mask(self, index: int) -> Tensor | None:
        """The units of layer ``index`` that are dead (or tau-dormant, when tracked) over a full window.

        ``None`` unless the layer is called once per batch and its windows are full. Built from
        synced numbers only, so it is the same tensor on every rank.
        """
        if self.calls_per_step(index) != 1:
            return None
        win = self.windows.get((index, 0))
        if win is None or win.ring is None or not win.full:
            return None
        mask = win.dead()
        awin = self.abs_windows.get((index, 0))
        if self.tau is not None and awin is not None and awin.sums is not None and awin.full:
            mask = mask | awin.dormant(self.tau).to(mask.device)
        return mask

    def reset_layer(self, index: int) -> None:
        """Forget layer ``index``'s window evidence (after a rescue changed what its units compute)."""
        for key in [k for k in self.windows if k[0] == index]:
            del self.windows[key]
        for key in [k for k in self.abs_windows if k[0] == index]:
            del self.abs_windows[key]

    def _act_hist_len(self, index: int) -> int:
        edges = self.capture.act_edges
        return 0 if edges is None else edges[self.capture.layers[index].name].numel() + 2

    def _grad_hist_len(self) -> int:
        edges = self.capture.grad_edges
        return 0 if edges is None else edges.numel() + 2

    def finish_validation(self) -> list[tuple[int, int]]:
        """End a validation pass: OR the fire masks across ranks, return (dead, units) per layer.

        Exact over every example of the pass on every rank; one collective, one transfer. A layer
        that no rank read during the pass (a training-only head, a branch skipped in eval) returns
        ``(0, 0)``: not observed is not dead. One "reported" flag per layer rides the same collective.
        """
        device = self.device()
        distributed = world_size() > 1
        plan: list[list[int]] = []

        def pack() -> tuple[list[Tensor], list[int], list[int]]:
            nonlocal plan
            parts: list[Tensor] = []
            plan = []
            for index, buf in enumerate(self.capture.buffers):
                masks = self._pack_masks(index, buf, distributed, device)
                parts += [vec for _slot, _width, vec in masks]
                plan.append([width for _slot, width, _vec in masks])
            parts.append(reported_flags(self.capture, device))
            return parts, [], []

        synced = self._sync_agreed(pack, device)
        if not distributed and not any(plan):
            return [(0, 0) for _ in plan]
        fired_per_layer = []
        start = 0
        for widths in plan:
            total = sum(widths)
            fired_per_layer.append((synced[start : start + total] > 0).sum().to(torch.float64).reshape(1))
            start += total
        flags = synced[start : start + len(plan)]
        host = torch.cat([*fired_per_layer, flags]).tolist()
        reported = host[len(plan) :]
        return [(sum(w) - int(f), sum(w)) if seen > 0 else (0, 0) for f, w, seen in zip(host, plan, reported)]

    def state_dict(self) -> dict[str, object]:
        return {
            "windows": {f"{i}:{s}": w.state_dict() for (i, s), w in self.windows.items()},
            "widths": {f"{i}:{s}": w for (i, s), w in self.widths.items()},
            "abs_windows": {f"{i}:{s}": w.state_dict() for (i, s), w in self.abs_windows.items()},
            "last_fired": {str(i): t.cpu() for i, t in self.last_fired.items()},
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        device = self.device()
        for key, width in dict(state.get("widths", {})).items():  # type: ignore[call-overload]
            i, s = (int(p) for p in key.split(":"))
            self.widths[(i, s)] = int(width)
        for key, wstate in dict(state.get("windows", {})).items():  # type: ignore[call-overload]
            i, s = (int(p) for p in key.split(":"))
            win = self.windows.setdefault((i, s), UnitWindow(self.window))
            win.load_state_dict(wstate, device)
        if self.tau is not None:
            for key, wstate in dict(state.get("abs_windows", {})).items():  # type: ignore[call-overload]
                i, s = (int(p) for p in key.split(":"))
                self.abs_windows.setdefault((i, s), AbsWindow(self.window)).load_state_dict(wstate, device)
        for key, steps in dict(state.get("last_fired", {})).items():  # type: ignore[call-overload]
            if isinstance(steps, Tensor):
                self.last_fired[int(key)] = steps.to(device=device, dtype=torch.int64)


def _moment_spans(entry: LayerPlan) -> list[tuple[int, int, int]]:
    """``(slot, offset, width)`` of each slot's ``[sums, squares, count]`` block, in slot order."""
    widths = {slot: width for slot, _offset, width in entry.slots}
    return [(slot, at, widths[slot]) for slot, at in entry.moment_slots.items()]
