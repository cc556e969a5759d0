"""One callback class for both Lightning packages.

``lightning.pytorch.Trainer`` and the standalone ``pytorch_lightning.Trainer`` check callbacks
against different ``Callback`` classes. When both packages are installed the monitor subclasses
both bases (they are plain classes with the same hook names), so either Trainer accepts it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
    plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    scaler = getattr(plugin, "scaler", None)
    scale = getattr(scaler, "_scale", None)
    if scaler is None or scale is None or not getattr(scaler, "_enabled", True):
        return None
    return scale.detach().clone()
