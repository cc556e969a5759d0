"""The opt-in rescue on a due sampled step, on every rank (the masks it reads are synced)."""

from __future__ import annotations

import warnings
from typing import Any

from lightning_health._compat import rank_zero
from lightning_health.monitor.record import Record
from lightning_health.rescue.runner import Rescuer


def rescue_step(rescuer: Rescuer, record: Record, trainer: Any, step: int, verbose: bool) -> dict[str, float]:
    """Apply the rescue when due; record each event; the scalars to log (``health/rescued_units/<layer>``)."""
    if not rescuer.due():
        return {}
    events, skipped = rescuer.apply(step, list(getattr(trainer, "optimizers", [])))
    for event in events:
        record.history.add(step, "rescued_units", event.layer, float(len(event.units)))
        if event.action == "leaky":  # a LeakyReLU cannot die: the dead and inactive rules no longer apply
            record.rectifiers.discard(event.layer)
            record.smooth.discard(event.layer)
    if rank_zero(trainer):
        for name in skipped:
            warnings.warn(
                f"HealthMonitor does not rescue `{name}`: it is called more than once per forward, so its units' "
                "evidence mixes several uses",
                RuntimeWarning,
                stacklevel=3,
            )
        if verbose:
            for event in events:
                print(f"HealthMonitor: rescue at {event}", flush=True)
    return Rescuer.scalars(events)
