"""The update-to-weight ratio of each module across one optimizer step: snapshot before, difference after.

How it is taken (a sampled step only; unsampled steps do nothing):

1. ``on_before_optimizer_step`` (after backward and AMP unscaling, before clipping and before the
   optimizer's update): :meth:`UpdateTracker.before_step` computes ``||W||`` of every module and
   copies the parameters of the modules it reads this step (exact copies, in their own dtype).
   Gradient clipping changes gradients, never weights, so this snapshot is the weights the update
   starts from. It is taken after backward, when the activations are freed: an optimizer
   ``step_pre_hook`` would run *before* Lightning's closure (forward and backward happen inside
   ``optimizer.step(closure)``) and hold the copy through the activation peak.
2. ``on_train_batch_end`` (after ``optimizer.step``, the scaler's update and ``zero_grad``):
   :meth:`UpdateTracker.after_step` subtracts the live weights from the copy in place, takes the
   norms, frees the copy and returns one float64 device vector that rides the step's one host
   transfer. A step the GradScaler skipped left the weights alone: it reads 0, exactly.

Cost: one read of every parameter (the norms) and, for the modules read, one copy and one
subtraction. The copy is the price of exactness for any optimizer; ``max_bytes`` bounds it. When the
modules do not fit the budget together, they are read in rotation (each sampled step reads the next
modules that fit), so every module is read every few sampled steps and the peak stays under the
budget. A module larger than the budget on its own is never read (the monitor says so at set-up).

Parameters that do not require a gradient at snapshot time (frozen after set-up) are not copied:
they read 0 update. Modules frozen before set-up are not among the groups at all, like
``param_grad_norm``. Under DDP the parameters are replicated, so every rank computes the same
numbers locally; no collective is needed. Sharded parameters (FSDP2 ``fully_shard``, tensor
parallel: DTensors) are read from each rank's local shard, weighted so a shard held by several ranks
counts once, and one sum all-reduce per read gives every rank the global norms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_health.capture.sharding import local_tensor
from lightning_health.diagnosis.learning import UpdateWindow, depth_profile
from lightning_health.pipeline.sync import replica_weight, sum_across_ranks, world_size
from lightning_health.readings.update import group_squares, snapshot, update_ratio, update_squares

Groups = Sequence[tuple[str, list[torch.nn.Parameter]]]


def group_bytes(params: Sequence[torch.nn.Parameter]) -> int:
    """Bytes one snapshot of ``params`` takes."""
    return sum(p.numel() * p.element_size() for p in params)


class UpdateTracker:
    """``param_norm`` of every module and ``update_ratio`` of the modules read this step.

    Args:
        groups: ``(module name, its parameters)``, as :func:`~lightning_health.pipeline.param_grads.layer_param_groups`.
        max_bytes: the most bytes one snapshot may hold; ``None``: no bound (every module every
            sampled step); ``0``: no update ratio at all (``param_norm`` only).
    """

    def __init__(self, groups: Groups, max_bytes: int | None) -> None:
        self.groups = list(groups)
        self.max_bytes = max_bytes
        self.sizes = [group_bytes(params) for _name, params in self.groups]
        self.too_large = [name for (name, _p), size in zip(self.groups, self.sizes) if max_bytes and size > max_bytes]
        self._cursor = 0
        self._owners: Tensor | None = None
        self._before: tuple[list[int], list[Tensor], Tensor, Tensor] | None = None  # chosen, copy, owners, norms
        self.peak_bytes = 0  # the largest snapshot taken so far
        self._live: list[torch.nn.Parameter] = []
        self._norms: Tensor | None = None
        # sharded parameters (FSDP2, tensor parallel): local shards, weighted so each element counts once
        self.sharded = any(hasattr(p, "placements") for _name, params in self.groups for p in params)
        self._weights: dict[Any, Tensor] = {}

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

    def before_step(self) -> None:
        """Norms of every module, and the copy of the modules to read (once per sampled step)."""
        if self._before is not None or not self.groups:
            return  # a second optimizer in the same step: the first snapshot covers both updates
        params = [p for _name, group in self.groups for p in group]
        device = params[0].device
        if self._owners is None or self._owners.device != device:
            owners = [g for g, (_name, group) in enumerate(self.groups) for _p in group]
            self._owners = torch.tensor(owners, dtype=torch.long, device=device)
        local = [local_tensor(p.detach()) for p in params]
        weights = self._shard_weights(params, device)
        norms = self._global_squares(group_squares(local, self._owners, len(self.groups), weights)).sqrt_()
        chosen = self._choose() if self.max_bytes != 0 else []
        live: list[torch.nn.Parameter] = []
        slots: list[int] = []
        for slot, i in enumerate(chosen):
            for p in self.groups[i][1]:
                if p.requires_grad:
                    live.append(p)
                    slots.append(slot)
        copy = snapshot([local_tensor(p.detach()) for p in live])
        self.peak_bytes = max(self.peak_bytes, sum(t.numel() * t.element_size() for t in copy))
        self._live = live
        owners_t = torch.tensor(slots, dtype=torch.long, device=device)
        picked = norms[torch.tensor(chosen, dtype=torch.long, device=device)]
        self._before = (chosen, copy, owners_t, picked)
        self._norms = norms

    def after_step(self) -> tuple[Tensor | None, list[int]]:
        """The device vector ``[param_norm per module, update_ratio per module read]`` and which were read.

        ``(None, [])`` when no snapshot was taken this step (no optimizer step ran).
        """
        if self._before is None:
            return None, []
        chosen, copy, owners, picked = self._before
        self._before = None
        live, self._live = self._live, []
        weights = self._shard_weights(live, owners.device)
        local = [local_tensor(p.detach()) for p in live]
        deltas = self._global_squares(update_squares(copy, local, owners, len(chosen), weights)).sqrt_()
        del copy
        assert self._norms is not None
        return torch.cat([self._norms, update_ratio(deltas, picked)]), chosen

    def discard(self) -> None:
        """Drop a snapshot that will not be read (the step was abandoned)."""
        self._before = None
        self._live = []

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
    for name, stats in window.add(step_readings, skipped).items():
        snapshot.setdefault(name, {}).update(stats)
    for name, row in depth_profile(order, snapshot).items():
        for metric in ("act_gain", "grad_gain"):
            if metric in row:
                logged.setdefault(metric, {})[name] = row[metric]
                snapshot[name][metric] = row[metric]
    return logged
