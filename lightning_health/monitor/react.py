"""What the monitor does when a finding turns critical: burst, print, then warn, stop or raise.

Every rank reacts alike (the findings come from synced readings), so ``"stop"`` and ``"raise"`` end
a DDP run on all ranks together; only rank zero prints and warns.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from lightning_health._compat import rank_zero
from lightning_health.diagnosis import Finding
from lightning_health.pipeline.schedule import SamplingSchedule


class HealthCriticalError(RuntimeError):
    """Raised by ``HealthMonitor(on_critical="raise")`` when a finding turns critical."""


def react(
    trainer: Any, escalated: Sequence[Finding], step: int, schedule: SamplingSchedule, on_critical: str, verbose: bool
) -> None:
    """Start a burst of sampling and act on ``on_critical`` for the findings that just turned critical."""
    critical = [f for f in escalated if f.severity == "critical"]
    if not critical:
        return
    lines = "\n".join(f"  {f}\n    hint: {f.hint}" for f in critical)
    burst = schedule.start_burst(step)
    lead = rank_zero(trainer)
    if lead and verbose:
        more = f"\n  sampling every step until step {schedule.burst_until}" if burst else ""
        print(f"HealthMonitor: critical finding(s) at step {step}:\n{lines}{more}", flush=True)
    if on_critical == "raise":
        raise HealthCriticalError(f"critical health finding(s) at step {step}:\n{lines}")
    if on_critical == "stop":
        trainer.should_stop = True
        if lead:
            print(f"HealthMonitor: stopping the run at step {step} (on_critical='stop').", flush=True)
    elif lead:
        warnings.warn(f"critical health finding(s) at step {step}:\n{lines}", RuntimeWarning, stacklevel=3)
