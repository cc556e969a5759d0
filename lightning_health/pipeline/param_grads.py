"""L2 norms of each monitored module's parameter gradients, batched over every module in one pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_health.capture.sharding import local_tensor
from lightning_health.pipeline.sync import full_where_partial, replica_weight, sum_across_ranks, world_size
from lightning_health.readings.update import tensor_squares


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

    One batched sum of squares over every gradient
    (:func:`~lightning_health.readings.update.tensor_squares`) and one segment sum replace a handful
    of small ops per module. The segment index lives on the device and is rebuilt only when the set
    of parameters with a gradient changes (building it is a host-to-device copy).

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
            squares = tensor_squares(grads)
            if self._index[2] is not None:  # sharded: each piece of a gradient counted once over the world
                squares = squares * self._index[2]
            out.index_add_(0, self._index[1], squares)
        if self.sharded:  # every rank runs this collective, with or without gradients
            out = sum_across_ranks(out)
        return out.sqrt_()
