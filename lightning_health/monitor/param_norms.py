"""Each module's parameter-gradient norm for one optimizer step, read before the optimizer that owns it steps.

With several optimizers in one step (manual optimization, GAN-style), a later backward adds to the
gradients of modules that an earlier optimizer already stepped: those keep their first reading.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_health.pipeline.param_grads import ParamGradNorms


class StepParamNorms:
    """The step's ``param_grad_norm`` vector on the device, filled optimizer by optimizer.

    Args:
        groups: ``(module name, its parameters)``, as
            :func:`~lightning_health.pipeline.param_grads.layer_param_groups`.
    """

    def __init__(self, groups: Sequence[tuple[str, list[torch.nn.Parameter]]]) -> None:
        self.groups = list(groups)
        self._reader = ParamGradNorms(self.groups)
        self._norms: Tensor | None = None
        self._read: tuple[bool, ...] = ()  # groups whose norm this step already read
        self._masks: dict[Any, Tensor] = {}  # (groups to take, device) -> bool mask, made once

    def read(self, optimizer: Any) -> None:
        """Read the norms of the modules ``optimizer`` owns and this step has not read yet (device only)."""
        if not self.groups:
            return
        ids = {id(p) for group in getattr(optimizer, "param_groups", []) for p in group["params"]}
        owned = tuple(not ids or any(id(p) in ids for p in params) for _name, params in self.groups)
        device = self.groups[0][1][0].device
        if self._norms is None:
            self._norms, self._read = self._reader(device), owned
            return
        take = tuple(o and not r for o, r in zip(owned, self._read))
        if not any(take):
            return
        mask = self._masks.get((take, device))
        if mask is None:
            mask = self._masks[(take, device)] = torch.tensor(take, dtype=torch.bool, device=device)
        self._norms = torch.where(mask, self._reader(device), self._norms)
        self._read = tuple(r or t for r, t in zip(self._read, take))

    def take(self) -> Tensor | None:
        """The step's norms (``None`` when no optimizer stepped), and a clean slate for the next step."""
        norms, self._norms, self._read = self._norms, None, ()
        return norms
