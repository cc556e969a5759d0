"""The per-step sync across ranks: fixed-size all-reduces whose payload does not grow with the world size.

A sampled step's packed vector is reduced with exactly two collectives over the default group:

- one ``SUM`` all-reduce of the whole vector (counts, sums, sums of squares, histogram counts, fire
  masks as 0/1, the layout flag), and
- one ``MAX`` all-reduce of the few fields that combine by min or max, mins sent negated
  (``min(x) = -max(-x)``).

Each rank sends and receives a vector of the packed layout's size, which depends on the model
(layers, units, histogram bins) and not on how many ranks there are; an ``all_gather`` of the
same vector would hand every rank one copy per rank. Tensor parallelism needs no third group: a
unit-sharded layer's fire mask is packed at the global width with each rank's units at their
offset (zeros elsewhere), and a layer replicated across the tensor-parallel group is reported by
one rank of the group only (see :mod:`lightning_health.capture.sharding`), so one sum over the
world group concatenates units across tensor-parallel ranks and ORs them across data-parallel ones.

The layout agreement (which (layer, call slot) masks every rank packs, and their widths) is also
fixed-size: one ``MAX`` all-reduce of the number of call slots per layer, then one ``MAX``
all-reduce of every slot's width. It runs only when some rank has seen a slot outside the agreed
layout (the first sampled step, or a new branch taken).

``all_reduce`` is looked up on this module at call time, so a test can count the bytes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor

Layout = dict[tuple[int, int], int]  # (layer, call slot) -> units


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(tensor: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
    """``torch.distributed.all_reduce`` over the default group, in place."""
    dist.all_reduce(tensor, op=op)


def sync_vector(vec: Tensor, min_idx: Tensor, max_idx: Tensor) -> Tensor:
    """Reduce ``vec`` across ranks: sum everywhere, min/max at the given indices; two all-reduces.

    Every rank must call this with vectors of the same layout; non-distributed runs return ``vec``.
    """
    if world_size() == 1:
        return vec
    extremes = torch.cat([vec[max_idx], -vec[min_idx]])
    out = vec.clone()
    out[max_idx] = 0.0  # keep +-inf of empty totals out of the sum (these fields are overwritten)
    out[min_idx] = 0.0
    all_reduce(out, dist.ReduceOp.SUM)
    if extremes.numel():
        all_reduce(extremes, dist.ReduceOp.MAX)
        out[max_idx] = extremes[: max_idx.numel()]
        out[min_idx] = -extremes[max_idx.numel() :]
    return out


def agree_layout(widths: Mapping[tuple[int, int], int], layers: int, device: torch.device) -> Layout:
    """Every rank: the union of all ranks' ``(layer, slot) -> width``, widths combined by max.

    Two ``MAX`` all-reduces: the slot count of each of the ``layers`` layers, then every slot's
    width. Sizes depend on the model only. A slot a rank never ran is packed as width 0 there.
    """
    counts = [0] * layers
    for layer, slot in widths:
        counts[layer] = max(counts[layer], slot + 1)
    slots = torch.tensor(counts, dtype=torch.float64, device=device)
    all_reduce(slots, dist.ReduceOp.MAX)
    counts = [int(c) for c in slots.tolist()]
    starts = [sum(counts[:i]) for i in range(layers)]
    local = [-1.0] * sum(counts)  # -1: this rank does not know the slot's width
    for (layer, slot), width in widths.items():
        local[starts[layer] + slot] = float(width)
    packed = torch.tensor(local, dtype=torch.float64, device=device)
    all_reduce(packed, dist.ReduceOp.MAX)
    host = packed.tolist()
    return {
        (layer, slot): int(host[starts[layer] + slot])
        for layer in range(layers)
        for slot in range(counts[layer])
        if host[starts[layer] + slot] >= 0
    }


def sum_across_ranks(vec: Tensor) -> Tensor:
    """One ``SUM`` all-reduce of a copy of ``vec`` (identity outside distributed runs)."""
    if world_size() == 1:
        return vec
    out = vec.clone()
    all_reduce(out, dist.ReduceOp.SUM)
    return out


def replica_weight(x: Tensor, world: int) -> float:
    """The weight of this rank's part of ``x`` in a sum over the world that counts each element once.

    A DTensor's local part is one of ``prod(mesh sizes of its Shard dims)`` distinct pieces and every
    rank holds one, so each piece is held ``world / pieces`` times; a plain tensor is replicated on
    every rank. Summing ``weight * local_sum`` over all ranks gives the global sum exactly (the
    weights are exact for power-of-two sizes, and within one rounding otherwise).
    """
    placements = getattr(x, "placements", None)
    if placements is None:
        return 1.0 / world
    mesh = x.device_mesh  # type: ignore[attr-defined]
    pieces = 1
    for dim, placement in enumerate(placements):
        if placement.is_shard() or type(placement).__name__ == "_StridedShard":
            pieces *= mesh.size(dim)
    return pieces / world


def full_where_partial(x: Tensor) -> Tensor:
    """A DTensor with ``Partial`` placements made ``Replicate`` there (a collective over those mesh dims)."""
    placements = getattr(x, "placements", None)
    if placements is None or not any(p.is_partial() for p in placements):
        return x
    from torch.distributed.tensor import Replicate

    return x.redistribute(placements=[Replicate() if p.is_partial() else p for p in placements])  # type: ignore[attr-defined]
