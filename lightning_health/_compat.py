"""One callback class for both Lightning packages.

``lightning.pytorch.Trainer`` and the standalone ``pytorch_lightning.Trainer`` check callbacks
against different ``Callback`` classes. When both packages are installed the monitor subclasses
both bases (they are plain classes with the same hook names), so either Trainer accepts it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

_bases: list[type] = []
try:
    from lightning.pytorch.callbacks import Callback as _LightningCallback

    _bases.append(_LightningCallback)
except ImportError:  # pragma: no cover - lightning is a hard dependency
    pass
try:
    from pytorch_lightning.callbacks import Callback as _PLCallback

    _bases.append(_PLCallback)
except ImportError:
    pass

if not _bases:  # pragma: no cover
    raise ModuleNotFoundError("lightning_health needs `lightning` (pip install lightning) or `pytorch_lightning`.")

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback as CallbackBase
elif len(_bases) == 1:
    CallbackBase = _bases[0]
else:
    CallbackBase = type("CallbackBase", tuple(_bases), {"__module__": __name__})


def rank_zero(trainer: Any) -> bool:
    """Whether this process is global rank zero (True outside distributed runs)."""
    return bool(getattr(trainer, "is_global_zero", True))


def grad_scale_tensor(trainer: Any) -> Any:
    """The AMP loss scale as a device tensor (no host sync), or None when gradients are unscaled."""
    strategy = getattr(trainer, "strategy", None)
    scaler = getattr(getattr(strategy, "precision_plugin", None), "scaler", None)
    if scaler is None or not getattr(scaler, "_enabled", True):
        return None
    scale = getattr(scaler, "_scale", None)
    if scale is None:
        # GradScaler creates its scale lazily, in the first scale() call (the first backward): until
        # then the scale that call will use is the initial one, a plain float (no device sync).
        init = getattr(scaler, "_init_scale", None)
        if init is None:
            return None
        return torch.full((), float(init), device=getattr(strategy, "root_device", "cpu"))
    return scale.detach().clone()


def amp_found_inf(trainer: Any, optimizer: Any) -> Any:
    """The GradScaler's "found inf/NaN" flag for ``optimizer`` this step, as a device tensor, or None.

    Read after ``unscale_`` (Lightning unscales before ``on_before_optimizer_step``). A non-zero
    value means the scaler will skip this optimizer step and lower its scale: the overflowing
    gradients are AMP working as designed, not a sick network.
    """
    scaler = getattr(getattr(getattr(trainer, "strategy", None), "precision_plugin", None), "scaler", None)
    states = getattr(scaler, "_per_optimizer_states", None)
    if not states:
        return None
    found = states.get(id(optimizer), {}).get("found_inf_per_device") or {}
    flags = [t.detach().reshape(()).float() for t in found.values()]
    if not flags:
        return None
    device = flags[0].device
    return torch.stack([f.to(device) for f in flags]).sum()
