"""When to sample: a function of the optimizer step (``trainer.global_step``) and a little state.

By default steps ``0, N, 2N, ...`` are sampled, so readings from different runs, and from every DDP
rank, land on the same steps without any communication.

Two refinements, both decided from numbers that are identical on every rank (they ride in the
step's one synced vector), so ranks never disagree about which step is sampled:

- **Overhead budget** (``max_overhead``): after each sampled step the interval is set so that the
  sampled step's extra time, spread over the interval, stays within the budget, e.g. 1% of the
  plain step time. The interval starts at ``every_n_steps``. A plain step must be timed to know
  the extra: while none has been (``every_n_steps=1``), the next step is left unsampled; while the
  budget allows every step, one step in :data:`REMEASURE_AFTER` is, so a cost that changes is seen.
- **Bursts**: when a finding turns critical or a non-finite value appears, every step is sampled
  for ``burst_steps`` steps, so the moment things broke is recorded in detail.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

MAX_INTERVAL = 1_000_000
REMEASURE_AFTER = 50
"""Sampled steps in a row after which a budget that allows every step leaves one step unsampled, to
time a plain step again (the extra cost is measured against it)."""


def validate_every_n_steps(every_n_steps: object) -> int:
    """Return ``every_n_steps`` if it is a positive int, else raise naming the argument."""
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
        raise TypeError(
            f"Expected `every_n_steps` to be a positive int, got {every_n_steps!r} ({type(every_n_steps).__name__})"
        )
    if every_n_steps <= 0:
        raise ValueError(f"Expected `every_n_steps` to be a positive int, got {every_n_steps}")
    return every_n_steps


def is_sampled(step: int, every_n_steps: int) -> bool:
    """Whether optimizer step ``step`` is read on the fixed cadence.

    Example:
        >>> [s for s in range(7) if is_sampled(s, 3)]
        [0, 3, 6]
    """
    return step % every_n_steps == 0


def budget_interval(sampled_seconds: float, idle_seconds: float, max_overhead: float) -> int | None:
    """The smallest interval whose amortised sampling cost stays within ``max_overhead``.

    A sampled step costs ``sampled_seconds - idle_seconds`` more than a plain one; spread over an
    interval of k steps that is ``extra / (k * idle_seconds)`` of the training time.

    Example:
        >>> budget_interval(sampled_seconds=0.15, idle_seconds=0.10, max_overhead=0.01)
        50
    """
    if not (math.isfinite(sampled_seconds) and math.isfinite(idle_seconds)) or idle_seconds <= 0:
        return None
    extra = max(sampled_seconds - idle_seconds, 0.0)
    k = math.ceil(extra / (max_overhead * idle_seconds) - 1e-9)
    return int(min(max(k, 1), MAX_INTERVAL))


class SamplingSchedule:
    """Which optimizer steps are read.

    Args:
        every_n_steps: the cadence (and, with a budget, the starting interval).
        max_overhead: ``None`` for the fixed cadence, or the fraction of training time the
            monitor may cost (e.g. ``0.01``).
        burst_steps: how many consecutive steps to sample after trouble (0 disables bursts).
    """

    def __init__(self, every_n_steps: int, max_overhead: float | None = None, burst_steps: int = 0) -> None:
        self.every_n_steps = every_n_steps
        self.max_overhead = max_overhead
        self.burst_steps = burst_steps
        self.interval = every_n_steps
        self.next_step = 0
        self.burst_until = -1
        self._in_a_row = 0  # budget mode: consecutive sampled steps at interval 1

    def should_sample(self, step: int) -> bool:
        if step <= self.burst_until:
            return True
        if self.max_overhead is None:
            return is_sampled(step, self.every_n_steps)
        return step >= self.next_step

    def after_sample(self, step: int, sampled_seconds: float, idle_seconds: float) -> None:
        """Set the next sampled step from the measured cost (budget mode only)."""
        if self.max_overhead is None:
            return
        interval = budget_interval(sampled_seconds, idle_seconds, self.max_overhead)
        if interval is None:  # no plain step timed yet: the next one stays plain, so one is
            interval = max(self.interval, 2)
        self._in_a_row = self._in_a_row + 1 if interval == 1 else 0
        if self._in_a_row >= REMEASURE_AFTER:  # time a plain step again: the costs may have moved
            interval, self._in_a_row = 2, 0
        self.interval = interval
        self.next_step = step + self.interval

    def start_burst(self, step: int) -> bool:
        """Sample every step after ``step`` for ``burst_steps`` steps. Returns whether a burst started."""
        if self.burst_steps <= 0 or step < self.burst_until:
            return False
        self.burst_until = step + self.burst_steps
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"interval": self.interval, "next_step": self.next_step, "burst_until": self.burst_until}

    def resume(self, state: dict[str, Any], saved_every: int) -> None:
        """Load a saved schedule; one saved at another cadence keeps only its burst, with a note."""
        if saved_every != self.every_n_steps:
            warnings.warn(
                f"HealthMonitor: resuming a run sampled every {saved_every} steps with every_n_steps="
                f"{self.every_n_steps}; its history carries over and sampling continues at the new cadence",
                UserWarning,
                stacklevel=3,
            )
            state = {"burst_until": state.get("burst_until", -1)}
        self.load_state_dict(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.interval = int(state.get("interval", self.interval))
        self.next_step = int(state.get("next_step", self.next_step))
        self.burst_until = int(state.get("burst_until", self.burst_until))


class StepTimer:
    """Optimizer steps timed start to start, for the overhead budget; a sampled step includes the monitor's work.

    The plain-step time is a running average; the sampled-step time is the latest. Step 0 (warm-up)
    and steps around a validation pass (:meth:`pause`) are not timed.
    """

    def __init__(self) -> None:
        self._current: tuple[int, float, bool] | None = None  # (step, start time, was it sampled)
        self.sampled_seconds = math.nan
        self.idle_seconds = math.nan

    def start(self, step: int) -> None:
        """A training batch of optimizer step ``step`` starts (the first micro-batch closes the previous step)."""
        if self._current is not None and self._current[0] == step:
            return  # another micro-batch of the same optimizer step
        now = time.perf_counter()
        current = self._current
        if current is not None and step == current[0] + 1 and current[0] > 0:
            seconds = now - current[1]
            if current[2]:
                self.sampled_seconds = seconds
            else:
                idle = self.idle_seconds
                self.idle_seconds = seconds if math.isnan(idle) else 0.8 * idle + 0.2 * seconds
        self._current = (step, now, False)

    def mark_sampled(self) -> None:
        """The step being timed is a sampled one."""
        if self._current is not None:
            self._current = (self._current[0], self._current[1], True)

    def pause(self) -> None:
        """A validation pass between two steps is not training time."""
        self._current = None
