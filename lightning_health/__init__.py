"""Per-layer activation and gradient health for PyTorch Lightning runs.

Example:
    >>> from lightning_health import HealthMonitor
    >>> monitor = HealthMonitor(every_n_steps=50)
"""

from lightning_health.callback import HealthCriticalError, HealthMonitor
from lightning_health.diagnosis import Finding, Thresholds, diagnose_curves
from lightning_health.rescue import reinit_dead_units, replace_activation

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
