"""Per-layer activation and gradient health for PyTorch Lightning runs.

The public names are imported lazily (PEP 562): ``import lightning_health.cli`` (the
``lightning-health report`` command) reads event files without importing Lightning or the callback,
so it starts in about a second instead of several.

Example:
    >>> from lightning_health import HealthMonitor
    >>> monitor = HealthMonitor(every_n_steps=50)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_health.callback import HealthCriticalError, HealthMonitor
    from lightning_health.diagnosis import Finding, Thresholds, diagnose_curves
    from lightning_health.rescue import reinit_dead_units, replace_activation

# public name -> the module that defines it
_LAZY = {
    "Finding": "lightning_health.diagnosis",
    "HealthCriticalError": "lightning_health.callback",
    "HealthMonitor": "lightning_health.callback",
    "Thresholds": "lightning_health.diagnosis",
    "diagnose_curves": "lightning_health.diagnosis",
    "reinit_dead_units": "lightning_health.rescue",
    "replace_activation": "lightning_health.rescue",
}

__all__ = [
    "Finding",
    "HealthCriticalError",
    "HealthMonitor",
    "Thresholds",
    "diagnose_curves",
    "reinit_dead_units",
    "replace_activation",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_health' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
