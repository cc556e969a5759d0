"""Per-layer activation and gradient health for PyTorch Lightning runs.

Example:
    >>> from lightning_health import HealthMonitor
    >>> monitor = HealthMonitor(every_n_steps=50)
"""

from lightning_health.callback import HealthCriticalError, HealthMonitor
from lightning_health.diagnosis import Finding, Thresholds, diagnose_curves

__all__ = ["Finding", "HealthCriticalError", "HealthMonitor", "Thresholds", "diagnose_curves"]
__version__ = "0.1.0"
