"""Where each monitored layer's units live under Lightning's ``ModelParallelStrategy`` (FSDP2 and tensor parallel).

FSDP2 (``fully_shard``) shards parameters, not activations: every rank computes the full
activations of its own examples, exactly as under DDP, so the activation readings need nothing
beyond the usual sum over ranks. Tensor parallelism splits a layer's *units*: after a
``ColwiseParallel`` Linear each rank of the tensor-parallel group holds the same examples but a
contiguous slice of the units; after a ``RowwiseParallel`` one (and outside the parallelized
region) every rank of the group holds the same full tensor.

So for each monitored layer this module decides, once, after ``configure_model``:

- **unit-sharded**: the layer's output is split on its unit axis (the last one). Each rank packs its
  fire mask and per-unit sums at the global width, its own units at ``rank * ceil(units / tp)``
  (DTensor's even chunking), zeros elsewhere; the one sum over the world concatenates the slices.
- **replicated** across the tensor-parallel group: only the group's first rank reports the layer
  (the others record nothing, like a rank with an empty batch), so totals are not counted ``tp``
  times.

The layout of a layer's output is read from the parallel style of the module that produced it:
the layer itself when it owns parameters, otherwise the nearest module registered before it that
owns parameters (as for the conv context in :mod:`lightning_health.capture.selection`). A
``ColwiseParallel`` module's weight is a DTensor sharded on its output-feature dimension (0 for
Linear, 1 for Embedding) over the mesh dimension named ``"tensor_parallel"``; anything else on
that dimension is replicated. A monitored tensor's width is checked against the expected slice at
every read, so a model whose data flow does not follow its registration order is reported (the
layer stops being read, with a warning) rather than read wrong.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import Tensor, nn

TP_DIM = "tensor_parallel"


@dataclasses.dataclass
class ShardPlan:
    """The tensor-parallel layout of the monitored layers on this rank."""

    tp_size: int = 1
    tp_rank: int = 0
    sharded: dict[int, tuple[int, int, int]] = dataclasses.field(default_factory=dict)  # index -> global, offset, local
    silent: set[int] = dataclasses.field(default_factory=set)  # replicated layers another rank reports

    def place(self, index: int, local: Tensor) -> Tensor:
        """``local`` per-unit values of layer ``index`` at the layer's global width (zeros off this rank's slice)."""
        shard = self.sharded.get(index)
        if shard is None:
            return local
        width, offset, expected = shard
        if local.numel() != expected:
            raise ValueError(
                f"expected {expected} of {width} units on tensor-parallel rank {self.tp_rank}, got {local.numel()}: "
                "the layer's units are not laid out as the module before it is parallelized; choose the layers "
                "with `layers=`"
            )
        out = local.new_zeros(width)
        out[offset : offset + expected] = local
        return out

    def counts_units(self, index: int) -> bool:
        """Whether this rank adds the per-unit value counts of layer ``index`` (one rank per unit slice set)."""
        return index not in self.sharded or self.tp_rank == 0


def is_model_parallel(strategy: Any) -> bool:
    """Lightning's ``ModelParallelStrategy`` (by class name, so no import is needed)."""
    return any(cls.__name__ == "ModelParallelStrategy" for cls in type(strategy).__mro__)


def _tp_mesh(strategy: Any) -> Any:
    mesh = getattr(strategy, "_device_mesh", None)
    if mesh is None or TP_DIM not in (mesh.mesh_dim_names or ()):
        return None
    return mesh[TP_DIM]


def _output_split(module: nn.Module) -> int | None:
    """The global output width when ``module``'s output is split on its last axis across the TP group."""
    from torch.distributed.tensor import DTensor

    weight = getattr(module, "weight", None)
    names = tuple(weight.device_mesh.mesh_dim_names or ()) if isinstance(weight, DTensor) else ()
    if TP_DIM not in names:
        return None
    assert isinstance(weight, DTensor)
    placement = weight.placements[names.index(TP_DIM)]
    out_dim = 1 if isinstance(module, nn.Embedding) else 0
    if placement.is_shard() and placement.dim % weight.dim() == out_dim:  # type: ignore[attr-defined]
        return int(weight.shape[out_dim])
    return None


def plan_layers(strategy: Any, model: nn.Module, layers: list[Any]) -> ShardPlan:
    """The :class:`ShardPlan` of ``layers`` (``MonitoredLayer``) under ``strategy``; empty outside tensor parallel."""
    mesh = _tp_mesh(strategy)
    if mesh is None or mesh.size() == 1:
        return ShardPlan()
    plan = ShardPlan(tp_size=mesh.size(), tp_rank=mesh.get_local_rank())
    source: dict[int, nn.Module | None] = {}
    last: nn.Module | None = None
    for _name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            last = module
        source[id(module)] = last
    for index, layer in enumerate(layers):
        producer = source.get(id(layer.module))
        width = _output_split(producer) if producer is not None and layer.neuron_dim == -1 else None
        if width is not None:
            chunk = math.ceil(width / plan.tp_size)
            offset = min(plan.tp_rank * chunk, width)
            plan.sharded[index] = (width, offset, min(chunk, width - offset))
        elif plan.tp_rank != 0:
            plan.silent.add(index)
    return plan


def local_tensor(x: Tensor) -> Tensor:
    """This rank's part of a DTensor (a plain tensor unchanged)."""
    to_local = getattr(x, "to_local", None)
    return to_local() if callable(to_local) else x


def bind_to_strategy(strategy: Any, model: nn.Module, capture: Any) -> None:
    """After ``configure_model``: lay the capture's layers out across the TP group, and re-register its hooks.

    Re-registering puts the monitor's forward hooks after those ``parallelize_module`` added, so
    they read the output a parallel style hands on (a local tensor, by default) rather than the
    one it is about to redistribute (a ``Partial`` sum after a ``RowwiseParallel`` Linear).
    """
    if not is_model_parallel(strategy):
        return
    capture.shards = plan_layers(strategy, model, capture.layers)
    capture.track_moments = False  # per-unit collapse is not laid out across ranks yet: not read when sharded
    capture.detach()
    capture.attach()
