"""The update-to-weight ratio of each module across one optimizer step: snapshot before, difference after.

How it is taken (a sampled step only; unsampled steps do nothing):

1. ``on_before_optimizer_step`` (after backward and AMP unscaling, before clipping and before the
   optimizer's update): :meth:`UpdateTracker.before_step` computes ``||W||`` of every module (first
   optimizer of the step) and copies the parameters that this optimizer steps, of the modules it
   reads this step (in their own dtype: whole, or a sample of a large one). Gradient clipping
   changes gradients, never weights, so this snapshot is the weights the update starts from. It is
   taken after backward, when the activations are freed: an optimizer ``step_pre_hook`` would run
   *before* Lightning's closure (forward and backward happen inside ``optimizer.step(closure)``) and
   hold the copy through the activation peak.
2. Right after that optimizer's ``step`` (a one-shot ``register_step_post_hook``), the live weights
   are subtracted from the copy in place, the squared norms are added to the step's totals and the
   copy is freed. An optimizer without step hooks, or a step the GradScaler skipped (it never calls
   ``step``: the weights did not move, it reads 0 exactly), is read at the next optimizer's
   ``on_before_optimizer_step`` or at ``on_train_batch_end``, whichever comes first.
3. ``on_train_batch_end``: :meth:`UpdateTracker.after_step` returns one float64 device vector that
   rides the step's one host transfer.

Several optimizers in one step (manual optimization, GAN-style): each parameter is copied before the
first optimizer that holds it steps, and read after that optimizer's step, so each module's ratio is
the update of its own optimizer, over its weights just before that update (also its ``param_norm``).
Lightning's ``toggle_optimizer`` turns off ``requires_grad`` of the other optimizers' parameters; they
are copied when their own optimizer steps. A parameter in no optimizer is not copied and reads 0
(unless no optimizer holds any monitored parameter, e.g. a wrapper stepping its own copies: then the
first optimizer's snapshot covers every module, read at the end of the batch).

Cost: one read of every parameter (the norms) and, for the modules read, one copy and one
subtraction of what is copied. A parameter of more than ``sample`` values is copied on a fresh random
sample of blocks each sampled step (:class:`~lightning_health.readings.update.Strata`): an
unbiased ``||W_after - W_before||^2`` for a copy of ``sample`` values (256 KiB in float32 at the
default), where copying every weight would add their size to the peak of a model whose memory peaks
in the optimizer's step (an MLP: +15% of the run's). ``sample=None`` copies every value (exact).
``max_bytes`` bounds the copy: when the modules do not fit the budget together, they are read in
rotation (each sampled step reads the next modules that fit), so every module is read every few
sampled steps and the peak stays under the budget. A module larger than the budget on its own is
never read (the monitor says so at set-up).

Parameters that do not require a gradient when their optimizer steps (frozen after set-up) are not
copied: they read 0 update. Modules frozen before set-up are not among the groups at all, like
``param_grad_norm``. Under DDP the parameters are replicated, so every rank computes the same
numbers locally; no collective is needed. Sharded parameters (FSDP2 ``fully_shard``, tensor
parallel: DTensors) are read from each rank's local shard, weighted so a shard held by several ranks
counts once, and sum all-reduces give every rank the global norms (one for the norms, one for the
differences, one more per later optimizer that brings modules of its own).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_health.capture.sharding import local_tensor
from lightning_health.diagnosis.learning import UpdateWindow, depth_profile
from lightning_health.pipeline.host_copy import to_device
from lightning_health.pipeline.sync import replica_weight, sum_across_ranks, world_size
from lightning_health.readings.update import (
    BLOCK,
    Strata,
    draw_blocks,
    group_squares,
    pieces,
    sampled_numel,
    snapshot,
    update_ratio,
    update_squares,
)

_INDEX_CACHE = 256
"""Distinct index lists kept on the device by :meth:`UpdateTracker._index` before it starts over."""

Groups = Sequence[tuple[str, list[torch.nn.Parameter]]]


_SEED = 0x5EED
"""Seeds the monitor's own generator of sampled blocks: the same draws on every rank and in every run."""


def group_bytes(params: Sequence[torch.nn.Parameter], sample: int | None = None) -> int:
    """Bytes one snapshot of ``params`` takes, each copied whole or on ``sample`` values (see
    :func:`~lightning_health.readings.update.sampled_numel`)."""
    return sum(sampled_numel(p.numel(), sample) * p.element_size() for p in params)


def _piece_weights(strata: Strata | None) -> list[float]:
    """The factor of each piece a parameter is copied in (see :attr:`Strata.weights`): one piece when whole."""
    return [1.0] if strata is None else strata.weights


def optimizer_param_ids(optimizer: Any) -> set[int] | None:
    """``id`` of every parameter ``optimizer`` steps; ``None`` when it does not say (no ``param_groups``)."""
    groups = getattr(optimizer, "param_groups", None)
    if not groups:
        return None
    return {id(p) for group in groups for p in group.get("params", [])}


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How one optimizer's list of parameters is copied, the same on every sampled step."""

    strata: list[Strata | None]  # per parameter (None: whole)
    runs: tuple[Tensor, Tensor] | None  # the sampled parameters' Strata.size and .wide, (P, 1) float64 on the device
    slots: Tensor  # per piece, its slot in `_Step.chosen`
    scale: Tensor | None  # per piece, the factor of its squares (sampling, shards); None: all 1


@dataclasses.dataclass
class _Copy:
    """The weights one optimizer is about to step, copied; read once after its step."""

    optimizer: Any
    live: list[torch.nn.Parameter]
    plan: _Plan
    blocks: list[Tensor | None]  # per live parameter, the blocks drawn this step
    copy: list[Tensor]  # the pieces of each live parameter, in order (see readings.update.pieces)
    nbytes: int


@dataclasses.dataclass
class _Step:
    """One sampled step's state, from the first optimizer's ``on_before_optimizer_step`` to ``after_step``."""

    chosen: list[int]  # groups read this step
    norms: Tensor  # ||W|| per group (float64, device); each read group's at its own snapshot
    deltas: Tensor  # ||W_after - W_before||^2 per chosen slot, this rank's share, summed over optimizers
    taken: set[int]  # ids of the parameters copied so far
    based: set[int]  # chosen slots whose ||W_before|| is set (at their first copy)
    pending: list[_Copy]
    handles: list[Any] = dataclasses.field(default_factory=list)  # step post hooks, removed once the step ends
    held: int = 0  # bytes of copies held now


class UpdateTracker:
    """``param_norm`` of every module and ``update_ratio`` of the modules read this step.

    Args:
        groups: ``(module name, its parameters)``, as :func:`~lightning_health.pipeline.param_grads.layer_param_groups`.
        max_bytes: the most bytes one snapshot may hold; ``None``: no bound (every module every
            sampled step); ``0``: no update ratio at all (``param_norm`` only).
        sample: values copied of a larger parameter, as random blocks (see module doc); ``None``: all.
    """

    def __init__(self, groups: Groups, max_bytes: int | None, sample: int | None = None) -> None:
        self.groups = list(groups)
        self.max_bytes = max_bytes
        self.sample = sample
        self.sizes = [group_bytes(params, sample) for _name, params in self.groups]
        self._generators: dict[torch.device, torch.Generator] = {}
        self._plans: dict[tuple[int, ...], _Plan] = {}  # by the ids of the parameters copied and their slots
        self.too_large = [name for (name, _p), size in zip(self.groups, self.sizes) if max_bytes and size > max_bytes]
        self._cursor = 0
        self._owners: Tensor | None = None
        self._step: _Step | None = None
        # the last sampled step's copy buffers, by parameter id: reused while sampling densely (a CPU
        # allocation of that size page-faults, ~7x the copy itself); dropped on the first plain step
        self._spare: dict[int, Tensor] = {}
        self.peak_bytes = 0  # the most bytes of copies held at once so far
        # sharded parameters (FSDP2, tensor parallel): local shards, weighted so each element counts once
        self.sharded = any(hasattr(p, "placements") for _name, params in self.groups for p in params)
        self._weights: dict[Any, Tensor] = {}
        self._indices: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}

    def _global_squares(self, squares: Tensor) -> Tensor:
        """Per-group sums of squares over the whole model: one sum all-reduce when sharded, else as is."""
        return sum_across_ranks(squares) if self.sharded else squares

    def _shard_weights(self, params: Sequence[Tensor], device: torch.device) -> Tensor | None:
        """Each parameter's replica weight (see :func:`~lightning_health.pipeline.sync.replica_weight`), cached."""
        if not self.sharded:
            return None
        key = (tuple(id(p) for p in params), device)
        if key not in self._weights:
            world = world_size()
            self._weights[key] = torch.tensor(
                [replica_weight(p, world) for p in params], dtype=torch.float64, device=device
            )
        return self._weights[key]

    def _index(self, values: Sequence[int], device: torch.device) -> Tensor:
        """``values`` as a long tensor on ``device``, copied without blocking and kept per distinct list
        (the rotation of :meth:`_choose` cycles, so the lists repeat; the cache is capped all the same)."""
        key = (tuple(values), device)
        index = self._indices.get(key)
        if index is None:
            if len(self._indices) >= _INDEX_CACHE:
                self._indices.clear()
            index = self._indices[key] = to_device(key[0], device)
        return index

    def _choose(self) -> list[int]:
        """The groups to read this step: all, or the next ones round-robin that fit ``max_bytes``."""
        n = len(self.groups)
        if self.max_bytes is None:
            return list(range(n))
        chosen, total = [], 0
        for k in range(n):
            i = (self._cursor + k) % n
            size = self.sizes[i]
            if size > self.max_bytes:
                continue
            if total + size > self.max_bytes:
                break
            chosen.append(i)
            total += size
        if chosen:
            self._cursor = (chosen[-1] + 1) % n
        return chosen

    def _norms_of(self, groups: Sequence[int], device: torch.device, owners: Tensor | None = None) -> Tensor:
        """``||W||`` of ``groups`` now (the global norms when sharded), in that order; ``owners``: each
        parameter's position in ``groups``, when the caller keeps it (else built here)."""
        params = [p for i in groups for p in self.groups[i][1]]
        if owners is None:
            owners = self._index([k for k, i in enumerate(groups) for _p in self.groups[i][1]], device)
        local = [local_tensor(p.detach()) for p in params]
        weights = self._shard_weights(params, device)
        return self._global_squares(group_squares(local, owners, len(groups), weights)).sqrt_()

    def _start(self, device: torch.device) -> _Step:
        """Norms of every module and the modules to read: once per sampled step, at its first optimizer."""
        if self._owners is None or self._owners.device != device:  # made once: no host-to-device copy per step
            owners = [g for g, (_name, group) in enumerate(self.groups) for _p in group]
            self._owners = torch.tensor(owners, dtype=torch.long, device=device)
        norms = self._norms_of(range(len(self.groups)), device, self._owners)
        chosen = self._choose() if self.max_bytes != 0 else []
        kept = {id(p) for i in chosen for p in self.groups[i][1]}  # a rotation's other buffers would break its budget
        self._spare = {key: t for key, t in self._spare.items() if key in kept}
        deltas = torch.zeros(len(chosen), dtype=torch.float64, device=device)
        return _Step(chosen, norms, deltas, set(), set(), [])

    def before_step(self, optimizer: Any = None) -> None:
        """Before ``optimizer`` steps: the norms (first optimizer of the step) and a copy of what it will move.

        Args:
            optimizer: the optimizer about to step; ``None``: every read module's parameters are copied.
        """
        if not self.groups:
            return
        device = self.groups[0][1][0].device
        step = self._step
        first = step is None
        if step is None:
            step = self._step = self._start(device)
        else:  # an earlier optimizer's step is over: read what its post hook did not
            for entry in [e for e in step.pending if e.optimizer is not optimizer]:
                self._read(entry)
        owned = optimizer_param_ids(optimizer)
        monitored = [p for _name, group in self.groups for p in group]
        if owned is not None and not any(id(p) in owned for p in monitored):
            owned = None  # it steps none of the monitored parameters itself (a wrapper's copies): copy them all
        live: list[torch.nn.Parameter] = []
        slots: list[int] = []
        for slot, i in enumerate(step.chosen):
            for p in self.groups[i][1]:
                if p.requires_grad and id(p) not in step.taken and (owned is None or id(p) in owned):
                    live.append(p)
                    slots.append(slot)
        if not live:
            return
        fresh = sorted(set(slots) - step.based)
        if not first and fresh:  # modules this optimizer is the first to move: their weights just before it
            groups = [step.chosen[s] for s in fresh]
            step.norms[self._index(groups, device)] = self._norms_of(groups, device)
        step.based.update(fresh)
        step.taken.update(id(p) for p in live)
        plan = self._plan(live, slots, device)
        blocks = self._draw(plan, device)
        copy = self._copies(live, plan.strata, blocks)
        nbytes = sum(t.numel() * t.element_size() for t in copy)
        entry = _Copy(optimizer, live, plan, blocks, copy, nbytes)
        step.pending.append(entry)
        step.held += nbytes
        self.peak_bytes = max(
            self.peak_bytes, step.held + sum(t.numel() * t.element_size() for t in self._spare.values())
        )
        if optimizer is not None and hasattr(optimizer, "register_step_post_hook"):
            # removed at the end of the step, not from inside it: torch iterates the hooks while calling them
            step.handles.append(optimizer.register_step_post_hook(lambda *_args: self._read(entry)))

    def _plan(self, live: Sequence[torch.nn.Parameter], slots: Sequence[int], device: torch.device) -> _Plan:
        """How ``live`` is copied, made on the host once per distinct list (the rotation repeats them)."""
        key = (*(id(p) for p in live), *slots)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _INDEX_CACHE:
                self._plans.clear()
            values = [local_tensor(p.detach()) for p in live]
            strata = [Strata.of(v.numel(), self.sample) for v in values]
            world = world_size() if self.sharded else 1
            factors, piece_slots = [], []
            for p, st, slot in zip(live, strata, slots):
                weights = _piece_weights(st)
                replica = replica_weight(p, world) if self.sharded else 1.0
                factors += [w * replica for w in weights]
                piece_slots += [slot] * len(weights)
            sampled = [st for st in strata if st is not None]
            runs = None
            if sampled:
                runs = (
                    to_device([float(st.size) for st in sampled], device, torch.float64).view(-1, 1),
                    to_device([float(st.wide) for st in sampled], device, torch.float64).view(-1, 1),
                )
            scale = None if all(f == 1.0 for f in factors) else to_device(factors, device, torch.float64)
            plan = self._plans[key] = _Plan(strata, runs, self._index(piece_slots, device), scale)
        return plan

    def _draw(self, plan: _Plan, device: torch.device) -> list[Tensor | None]:
        """This step's blocks of every sampled parameter of ``plan`` (one draw for all of them)."""
        if plan.runs is None:
            return [None] * len(plan.strata)
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device).manual_seed(_SEED)
        drawn = max(st.drawn for st in plan.strata if st is not None)  # the same for all: sample // BLOCK
        rows = iter(draw_blocks(*plan.runs, drawn, generator).unbind(0))
        return [None if st is None else next(rows) for st in plan.strata]

    def _copies(
        self, live: Sequence[torch.nn.Parameter], strata: Sequence[Strata | None], blocks: Sequence[Tensor | None]
    ) -> list[Tensor]:
        """Copies of ``live``'s local values (their sampled pieces, see
        :func:`~lightning_health.readings.update.pieces`): a whole one into the last sampled step's
        buffer where it matches, else fresh (see :func:`~lightning_health.readings.update.snapshot`)."""
        out = []
        for p, st, picked in zip(live, strata, blocks):
            value, spare = local_tensor(p.detach()), self._spare.pop(id(p), None)
            if st is not None:  # the gathered blocks are a fresh tensor already; the tail is a view
                sampled = pieces(value, st, picked)
                out += sampled[:-1] + snapshot(sampled[-1:]) if st.n % BLOCK else sampled
                continue
            fits = spare is not None and (spare.shape, spare.dtype, spare.device) == (
                value.shape,
                value.dtype,
                value.device,
            )
            out.append(spare.copy_(value) if fits else snapshot([value])[0])  # type: ignore[union-attr]
        return out

    def release(self) -> None:
        """Drop the buffers kept from the last sampled step: the next one is not close (a plain step ran)."""
        self._spare.clear()

    def _read(self, entry: _Copy) -> None:
        """The squared differences of one copy with the live weights, added to the step's; the copy freed."""
        step = self._step
        if step is None or entry not in step.pending:
            return  # read already: the same optimizer stepped again in this batch, or the batch is over
        step.pending.remove(entry)
        values = [local_tensor(p.detach()) for p in entry.live]
        plan = entry.plan
        local = [t for v, st, b in zip(values, plan.strata, entry.blocks) for t in pieces(v, st, b)]
        step.deltas += update_squares(entry.copy, local, plan.slots, len(step.chosen), plan.scale)
        step.held -= entry.nbytes
        # kept for the next sampled step on a CPU only: there a fresh buffer page-faults; a GPU's caching
        # allocator hands the same blocks back, and a kept copy would sit through the next step's peak
        at = 0
        for p, st, v in zip(entry.live, plan.strata, values):
            if st is None and v.device.type == "cpu":
                self._spare[id(p)] = entry.copy[at]
            at += len(_piece_weights(st))
        entry.copy = []

    def after_step(self) -> tuple[Tensor | None, list[int]]:
        """The device vector ``[param_norm per module, update_ratio per module read]`` and which were read.

        ``(None, [])`` when no snapshot was taken this step (no optimizer step ran).
        """
        step = self._step
        if step is None:
            return None, []
        for entry in list(step.pending):
            self._read(entry)
        self._step = None
        for handle in step.handles:
            handle.remove()
        deltas = self._global_squares(step.deltas).sqrt_()
        picked = step.norms[self._index(step.chosen, step.norms.device)]
        return torch.cat([step.norms, update_ratio(deltas, picked)]), step.chosen

    def discard(self) -> None:
        """Drop a snapshot that will not be read (the step was abandoned), and its hooks."""
        step, self._step = self._step, None
        self._spare.clear()
        for handle in step.handles if step is not None else []:
            handle.remove()

    def readings(self, host: Sequence[float], chosen: Sequence[int]) -> dict[str, dict[str, float]]:
        """Host numbers -> ``{module: {"param_norm": .., "update_ratio": ..}}`` (ratio only where read)."""
        n = len(self.groups)
        out = {name: {"param_norm": float(host[g])} for g, (name, _p) in enumerate(self.groups)}
        for k, g in enumerate(chosen):
            out[self.groups[g][0]]["update_ratio"] = float(host[n + k])
        return out


def fold_learning(
    step_readings: dict[str, dict[str, float]],
    grad_norms: Sequence[tuple[str, float]],
    window: UpdateWindow,
    snapshot: dict[str, dict[str, float]],
    order: Sequence[str],
    skipped: bool,
    step: int = 0,
) -> dict[str, dict[str, float]]:
    """One sampled step's learning readings on the host: what to log, and what the rules read.

    Adds to ``snapshot`` (the diagnosis input) the window statistics of each judged module's update
    ratio and the depth profile's gains of each monitored layer.

    Args:
        step_readings: :meth:`UpdateTracker.readings` of this step.
        grad_norms: ``(module, param_grad_norm)`` of this step.
        window: the modules' judged update ratios (see :class:`~lightning_health.diagnosis.learning.UpdateWindow`).
        snapshot: ``{layer: readings}`` of the monitored layers; updated in place.
        order: the monitored layers in forward order.
        skipped: the GradScaler skipped this optimizer step.
        step: the global step of the readings.

    Returns:
        ``{metric: {layer: value}}`` to log: ``param_norm``, ``update_ratio``, ``act_gain``, ``grad_gain``.
    """
    logged: dict[str, dict[str, float]] = {}
    for name, value in grad_norms:
        step_readings.setdefault(name, {})["param_grad_norm"] = value
    for name, r in step_readings.items():
        for metric in ("param_norm", "update_ratio"):
            if metric in r:
                logged.setdefault(metric, {})[name] = r[metric]
    for name, stats in window.add(step_readings, skipped, step).items():
        snapshot.setdefault(name, {}).update(stats)
    for name, row in depth_profile(order, snapshot).items():
        for metric in ("act_gain", "grad_gain"):
            if metric in row:
                logged.setdefault(metric, {})[name] = row[metric]
                snapshot[name][metric] = row[metric]
    return logged
