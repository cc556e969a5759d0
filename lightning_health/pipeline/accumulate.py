"""From per-layer device buffers to host numbers: pack, sync across ranks once, window, transfer once.

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

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_health.capture.hooks import Capture, StepBuffers
from lightning_health.capture.sharding import local_tensor
from lightning_health.pipeline.sync import (
    agree_layout,
    full_where_partial,
    replica_weight,
    sum_across_ranks,
    sync_vector,
    world_size,
)
from lightning_health.readings import reductions as R
from lightning_health.readings.collapse import collapsed_units
from lightning_health.readings.dormancy import dormant_mask, update_last_fired


@dataclasses.dataclass
class LayerReading:
    """One layer's numbers at one sampled step, on the host."""

    metrics: dict[str, float]
    act_hist: list[float] | None = None
    grad_hist: list[float] | None = None
    dead_units: int | None = None  # None until the window holds enough evidence
    units: int = 0
    dormant_units: int | None = None  # tau-dormant over the window; None until full, or untracked
    alive_fraction: float | None = None  # share of units that fired on this sampled step (any rank)
    collapsed_fraction: float | None = None  # share of units constant across this step's batch (collapse.py)


class _Ring:
    """Where the next row of a ``size``-row ring goes, and how many rows hold evidence."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.filled = 0
        self.pos = 0

    @property
    def full(self) -> bool:
        return self.filled >= self.size

    def _advance(self) -> None:
        self.pos = (self.pos + 1) % self.size
        self.filled = min(self.filled + 1, self.size)

    def _load_position(self, state: dict[str, object]) -> None:
        self.filled = int(state.get("filled", 0))  # type: ignore[call-overload]
        self.pos = int(state.get("pos", 0))  # type: ignore[call-overload]


class UnitWindow(_Ring):
    """The last ``size`` fire masks of one layer call slot, as a ring on the device."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.ring: Tensor | None = None

    def push(self, fired: Tensor) -> None:
        if self.ring is None or self.ring.shape[1] != fired.numel() or self.ring.device != fired.device:
            self.ring = torch.zeros(self.size, fired.numel(), dtype=torch.bool, device=fired.device)
            self.filled = self.pos = 0
        self.ring[self.pos] = fired
        self._advance()

    def dead(self) -> Tensor:
        """Per-unit bool: never fired in the window."""
        assert self.ring is not None
        return ~self.ring.any(dim=0)

    def state_dict(self) -> dict[str, object]:
        return {"ring": None if self.ring is None else self.ring.cpu(), "filled": self.filled, "pos": self.pos}

    def load_state_dict(self, state: dict[str, object], device: torch.device) -> None:
        ring = state.get("ring")
        self.ring = ring.to(device) if isinstance(ring, Tensor) else None
        if self.ring is not None and self.ring.shape[0] != self.size:  # window size changed: start afresh
            self.ring, self.filled, self.pos = None, 0, 0
            return
        self._load_position(state)


class AbsWindow(_Ring):
    """The last ``size`` per-unit ``|activation|`` sums of one layer call slot and their counts."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.sums: Tensor | None = None
        self.counts: Tensor | None = None

    def push(self, sums: Tensor, count: Tensor) -> None:
        if self.sums is None or self.sums.shape[1] != sums.numel() or self.sums.device != sums.device:
            self.sums = torch.zeros(self.size, sums.numel(), dtype=torch.float64, device=sums.device)
            self.counts = torch.zeros(self.size, dtype=torch.float64, device=sums.device)
            self.filled = self.pos = 0
        assert self.counts is not None
        self.sums[self.pos] = sums
        self.counts[self.pos] = count.reshape(())
        self._advance()

    def dormant(self, tau: float) -> Tensor:
        """Per-unit bool: tau-dormant over the window (see :func:`lightning_health.readings.dormancy.dormant_mask`)."""
        assert self.sums is not None and self.counts is not None
        return dormant_mask(self.sums.sum(dim=0), self.counts.sum(), tau)

    def state_dict(self) -> dict[str, object]:
        return {
            "sums": None if self.sums is None else self.sums.cpu(),
            "counts": None if self.counts is None else self.counts.cpu(),
            "filled": self.filled,
            "pos": self.pos,
        }

    def load_state_dict(self, state: dict[str, object], device: torch.device) -> None:
        sums, counts = state.get("sums"), state.get("counts")
        if not isinstance(sums, Tensor) or not isinstance(counts, Tensor) or sums.shape[0] != self.size:
            self.sums, self.counts, self.filled, self.pos = None, None, 0, 0
            return
        self.sums, self.counts = sums.to(device), counts.to(device)
        self._load_position(state)


@dataclasses.dataclass
class _LayerPlan:
    """Where one layer's numbers sit in the packed vector."""

    base: int
    act_hist: tuple[int, int] | None = None
    grad_hist: tuple[int, int] | None = None
    slots: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # (slot, offset, width)
    windows: list[tuple[int, bool]] = dataclasses.field(default_factory=list)  # (width, window full)
    abs_slots: dict[int, int] = dataclasses.field(default_factory=dict)  # slot -> offset of sums (+ count)
    dormant: list[bool] = dataclasses.field(default_factory=list)  # per pushed AbsWindow: full
    alive_width: int = 0  # units of the slots that reported this step
    moment_slots: dict[int, int] = dataclasses.field(default_factory=dict)  # slot -> offset of moments (+ count)


def _zeros(n: int, device: torch.device) -> Tensor:
    return torch.zeros(n, dtype=torch.float64, device=device)


def _slice(host: list[float], span: tuple[int, int] | None) -> list[float] | None:
    return None if span is None else host[span[0] : span[0] + span[1]]


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
                out.append((slot, width, _zeros(width, device)))
                continue
            vec = mask.to(device=device, dtype=torch.float64).reshape(-1)
            if vec.numel() != width:  # DDP: ranks disagreed on the width; pad/cut to the agreed one
                vec = torch.cat([vec, _zeros(width, device)])[:width]
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
            packed = torch.cat(parts) if parts else _zeros(0, device)
            synced = sync_vector(packed, *self._reduction_indices(min_idx, max_idx, device))
            if not distributed or synced[-1].item() == 0:  # the layout flag (DDP only)
                return synced
            self._agree_layout()  # every rank saw the flag: agree, then pack and sync again

    def finish_train_step(
        self, extra: Tensor | None = None, shared_max: Tensor | None = None, step: int | None = None
    ) -> tuple[list[LayerReading], list[float], list[float]]:
        """End a sampled training step: pack, sync, window, transfer once.

        Args:
            extra: a float64 device vector appended after sync (already identical on every rank,
                e.g. parameter gradient norms) so it rides on the same host transfer.
            shared_max: per-rank numbers to reduce with ``max`` in the same collective (e.g. step
                timings), so every rank takes the same decisions from them.
            step: the global step, recorded in :attr:`last_fired` (not recorded when ``None``).

        Returns:
            One :class:`LayerReading` per monitored layer, and the host copies of ``extra`` and of
            the synced ``shared_max``.
        """
        device = self.device()
        distributed = world_size() > 1
        plan: list[_LayerPlan] = []
        shared_at = 0

        def pack() -> tuple[list[Tensor], list[int], list[int]]:
            nonlocal plan, shared_at
            parts: list[Tensor] = []
            min_idx: list[int] = []
            max_idx: list[int] = []
            plan = []
            offset = 0
            for index, buf in enumerate(self.capture.buffers):
                entry = _LayerPlan(base=offset)
                act = buf.act if buf.act is not None else R.empty_activation_totals(device)
                grad = buf.grad if buf.grad is not None else R.empty_gradient_totals(device)
                min_idx.append(offset + R.A_MIN)
                max_idx += [offset + R.A_MAX, offset + R.ACTIVATION_WIDTH + R.G_ABSMAX]
                parts += [act.to(device), grad.to(device)]
                offset += R.ACTIVATION_WIDTH + R.GRADIENT_WIDTH
                for attr, hist, length in (
                    ("act_hist", buf.act_hist, self._act_hist_len(index)),
                    ("grad_hist", buf.grad_hist, self._grad_hist_len()),
                ):
                    if length:
                        parts.append(hist.to(device) if hist is not None else _zeros(length, device))
                        setattr(entry, attr, (offset, length))
                        offset += length
                for slot, width, vec in self._pack_masks(index, buf, distributed, device):
                    parts.append(vec)
                    entry.slots.append((slot, offset, width))
                    offset += width
                    if self.tau is not None:  # per-unit |activation| sums, then their count
                        sums, count = buf.abs_sums.get(slot), float(buf.abs_counts.get(slot, 0))
                        ok = sums is not None and sums.numel() == width
                        parts.append(sums.to(device) if ok else _zeros(width, device))  # type: ignore[union-attr]
                        parts.append(torch.full((1,), count, dtype=torch.float64, device=device))  # a fill, no copy
                        entry.abs_slots[slot] = offset
                        offset += width + 1
                    if self.collapse_ratio is not None:
                        offset += _pack_moments(parts, buf, slot, width, device)
                        entry.moment_slots[slot] = offset - 2 * width - 1
                plan.append(entry)
            shared_at = offset
            if shared_max is not None:
                parts.append(shared_max.to(device=device, dtype=torch.float64))
                max_idx += range(offset, offset + shared_max.numel())
            return parts, min_idx, max_idx

        synced = self._sync_agreed(pack, device)
        # Windows and dead counts on the device, from the synced (global) fire masks.
        dead_counts: list[Tensor] = []
        for index, entry in enumerate(plan):
            fired_now: list[Tensor] = []
            dormant_counts: list[Tensor] = []
            for slot, start, width in entry.slots:
                win = self.windows.setdefault((index, slot), UnitWindow(self.window))
                reported = distributed or self.capture.buffers[index].fired.get(slot) is not None
                if reported:
                    fired = synced[start : start + width] > 0
                    win.push(fired)
                    fired_now.append(fired)
                    entry.alive_width += width
                if win.ring is not None:
                    dead_counts.append(win.dead().sum().to(torch.float64).reshape(1))
                    entry.windows.append((width, win.full))
                if slot in entry.abs_slots and self.tau is not None:
                    awin = self.abs_windows.setdefault((index, slot), AbsWindow(self.window))
                    at = entry.abs_slots[slot]
                    if reported:
                        awin.push(synced[at : at + width], synced[at + width])
                    if awin.sums is not None:
                        dormant_counts.append(awin.dormant(self.tau).sum().to(torch.float64).reshape(1))
                        entry.dormant.append(awin.full)
            dead_counts += dormant_counts  # per layer: dead counts, then dormant counts, then alive, then collapse
            if fired_now:
                dead_counts.append(sum(f.sum() for f in fired_now).to(torch.float64).reshape(1))  # type: ignore[union-attr]
                self._record_fired(index, fired_now, step)
            if entry.moment_slots and self.collapse_ratio is not None:
                dead_counts.append(_collapsed(synced, entry.moment_slots, entry.slots, self.collapse_ratio))
        tail = [synced, *dead_counts]
        if extra is not None:
            tail.append(extra.to(device=device, dtype=torch.float64))
        host = torch.cat(tail).tolist()  # the one device-to-host transfer of the step

        readings = []
        cursor = synced.numel()
        for entry in plan:
            act_host: list[float] = host[entry.base : entry.base + R.ACTIVATION_WIDTH]
            grad_host: list[float] = host[
                entry.base + R.ACTIVATION_WIDTH : entry.base + R.ACTIVATION_WIDTH + R.GRADIENT_WIDTH
            ]
            dead = units = 0
            dormant: int | None = 0
            for width, _full in entry.windows:
                dead += int(host[cursor])
                cursor += 1
                units += width
            for _full in entry.dormant:
                dormant = (dormant or 0) + int(host[cursor])
                cursor += 1
            if not entry.dormant or not all(entry.dormant) or len(entry.dormant) != len(entry.windows):
                dormant = None
            alive = None
            if entry.alive_width:
                alive = host[cursor] / entry.alive_width
                cursor += 1
            collapsed = None
            if entry.moment_slots and self.collapse_ratio is not None:
                collapsed = host[cursor] / host[cursor + 1] if host[cursor + 1] > 0 else None
                cursor += 2
            complete = bool(entry.windows) and all(full for _w, full in entry.windows)
            if act_host[R.A_COUNT] <= 0:  # not read on any rank this step: no unit reading (not observed, not dead)
                complete, alive, collapsed = False, None, None
            readings.append(
                LayerReading(
                    metrics={**R.derive_activation(act_host), **R.derive_gradient(grad_host)},
                    act_hist=_slice(host, entry.act_hist) if act_host[R.A_COUNT] > 0 else None,
                    grad_hist=_slice(host, entry.grad_hist) if grad_host[R.G_COUNT] > 0 else None,
                    dead_units=dead if complete else None,
                    units=units,
                    dormant_units=dormant if complete else None,
                    alive_fraction=alive,
                    collapsed_fraction=collapsed,
                )
            )
        shared = host[shared_at : synced.numel() - (1 if distributed else 0)]  # not the layout flag
        return readings, (host[cursor:] if extra is not None else []), shared

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
            parts.append(_reported_flags(self.capture, device))
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


def _reported_flags(capture: Capture, device: torch.device) -> Tensor:
    """One float64 per layer: 1 where this rank read the layer since the last reset (summed across ranks)."""
    flags = _zeros(len(capture.buffers), device)
    for index in capture.reported:
        flags[index] = 1.0  # a fill on the device, no host-to-device copy
    return flags


def _pack_moments(parts: list[Tensor], buf: StepBuffers, slot: int, width: int, device: torch.device) -> int:
    """Append one slot's per-unit moments (zeros where it did not report) and their count; the length packed."""
    moments, count = buf.moments.get(slot), float(buf.moment_counts.get(slot, 0))
    ok = moments is not None and moments.numel() == 2 * width
    parts.append(moments.to(device) if ok else _zeros(2 * width, device))  # type: ignore[union-attr]
    parts.append(torch.full((1,), count if ok else 0.0, dtype=torch.float64, device=device))
    return 2 * width + 1


def _collapsed(synced: Tensor, moment_slots: dict[int, int], slots: list[tuple[int, int, int]], ratio: float) -> Tensor:
    """``[collapsed units, units measured]`` of one layer, summed over its call slots (on the device)."""
    widths = {slot: width for slot, _offset, width in slots}
    total = _zeros(2, synced.device)
    for slot, at in moment_slots.items():
        width = widths[slot]
        total = total + collapsed_units(synced[at : at + 2 * width], synced[at + 2 * width], ratio)
    return total


def layer_param_groups(modules: Sequence[tuple[str, torch.nn.Module]]) -> list[tuple[str, list[torch.nn.Parameter]]]:
    """The modules that own parameters directly, with those parameters (for gradient norms)."""
    groups = []
    for name, module in modules:
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if params:
            groups.append((name, params))
    return groups


class ParamGradNorms:
    """L2 norm of each module's parameter gradients, in one batched pass.

    One ``_foreach_norm`` over every gradient and one segment sum replace a handful of small ops per
    module. The segment index lives on the device and is rebuilt only when the set of parameters
    with a gradient changes (building it is a host-to-device copy).

    Sharded parameters (DTensor, from FSDP2's ``fully_shard`` or tensor parallel): each rank squares
    its local shards, weighted so that a shard held by several ranks counts once
    (:func:`lightning_health.pipeline.sync.replica_weight`), and one sum all-reduce of the per-module
    vector gives every rank the exact global norm. Unsharded runs issue no collective here.
    """

    def __init__(self, groups: Sequence[tuple[str, list[torch.nn.Parameter]]]) -> None:
        self.groups = list(groups)
        self._index: tuple[tuple[int, ...], Tensor, Tensor | None] | None = None
        self.sharded = any(hasattr(p, "placements") for _name, params in self.groups for p in params)

    def __call__(self, device: torch.device) -> Tensor:
        """Per group, the norm of its gradients (0 where none), as a float64 device vector."""
        grads: list[Tensor] = []
        owners: list[int] = []
        weights: list[float] = []
        world = world_size()
        for g, (_name, params) in enumerate(self.groups):
            for p in params:
                if p.grad is not None:
                    grad = p.grad.detach()
                    if self.sharded:
                        grad = full_where_partial(grad)
                        weights.append(replica_weight(grad, world))
                    grads.append(local_tensor(grad).to(device))
                    owners.append(g)
        out = torch.zeros(len(self.groups), dtype=torch.float64, device=device)
        if grads:
            key = tuple(owners)
            if self._index is None or self._index[0] != key or self._index[1].device != device:
                scale = torch.tensor(weights, dtype=torch.float64, device=device) if self.sharded else None
                self._index = (key, torch.tensor(owners, dtype=torch.long, device=device), scale)
            squares = torch.stack(torch._foreach_norm(grads)).to(torch.float64).square()
            if self._index[2] is not None:  # sharded: each piece of a gradient counted once over the world
                squares = squares * self._index[2]
            out.index_add_(0, self._index[1], squares)
        if self.sharded:  # every rank runs this collective, with or without gradients
            out = sum_across_ranks(out)
        return out.sqrt_()
