"""Sampling cadence, the overhead budget and bursts on trouble."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest

from lightning_health import HealthMonitor
from lightning_health.offline.patients import PatientMLP, patient_loaders
from lightning_health.pipeline.schedule import SamplingSchedule, budget_interval
from tests.conftest import trainer_kwargs


def test_fixed_cadence_is_aligned_to_multiples():
    s = SamplingSchedule(5)
    assert [k for k in range(16) if s.should_sample(k)] == [0, 5, 10, 15]


def test_budget_interval_spreads_the_extra_cost():
    assert budget_interval(0.15, 0.10, 0.01) == 50  # 50 ms extra over 100 ms steps at 1%
    assert budget_interval(0.10, 0.10, 0.01) == 1  # free sampling: every step
    assert budget_interval(float("nan"), 0.1, 0.01) is None


def test_burst_samples_every_step_then_returns_to_the_cadence():
    s = SamplingSchedule(10, burst_steps=3)
    assert s.start_burst(20)
    assert [k for k in range(20, 45) if s.should_sample(k)] == [20, 21, 22, 23, 30, 40]
    assert SamplingSchedule(10, burst_steps=0).start_burst(5) is False


@pytest.mark.parametrize("value", [0, 1.5, -0.1, "1%"])
def test_max_overhead_is_validated(value):
    with pytest.raises(ValueError, match="max_overhead"):
        HealthMonitor(max_overhead=value)


def test_a_critical_finding_starts_a_burst_in_a_real_run():
    monitor = HealthMonitor(every_n_steps=20, burst_steps=4, verbose=False)
    train, _ = patient_loaders()
    pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_steps=45)).fit(PatientMLP("normal", 0.8), train)
    steps = [s for s, _ in monitor.curves("act_std")["net.1"]]
    onset = min(f.step for f in monitor.diagnose() if f.severity == "critical")
    assert onset in steps
    burst = [onset + k for k in range(1, 5)]
    assert all(k in steps for k in burst)  # the four steps after the onset are sampled densely
    assert [k for k in steps if k not in burst] == [k for k in range(0, 45, 20)]  # otherwise the cadence


class _SlowSteps(pl.Callback):
    """Adds `seconds` to every sampled step (sampled=True) or to every plain step (sampled=False)."""

    def __init__(self, monitor: HealthMonitor, seconds: float, sampled: bool) -> None:
        self.monitor, self.seconds, self.sampled = monitor, seconds, sampled

    def on_train_batch_end(self, *args):
        if (self.monitor._armed_step is not None) == self.sampled:
            time.sleep(self.seconds)


def test_a_budget_starting_at_every_step_times_a_plain_step_and_retimes_one_now_and_then():
    """Starting at every step, no plain step would ever be timed and the budget could never act."""
    schedule = SamplingSchedule(1, max_overhead=0.01)
    assert schedule.should_sample(0)
    schedule.after_sample(0, sampled_seconds=0.15, idle_seconds=float("nan"))
    assert not schedule.should_sample(1) and schedule.should_sample(2)  # step 1 is timed as a plain step
    schedule.after_sample(2, sampled_seconds=0.15, idle_seconds=0.10)
    assert schedule.interval == 50
    free = SamplingSchedule(1, max_overhead=0.9)
    sampled = [s for s in range(200) if free.should_sample(s) and free.after_sample(s, 0.1, 0.1) is None]
    unsampled = sorted(set(range(200)) - set(sampled))
    assert unsampled == [50, 101, 152]  # every step, but one plain step after 50 sampled in a row


@pytest.mark.parametrize(
    "slow_sampled,budget,grows,every", [(True, 0.01, True, 4), (False, 0.9, False, 4), (True, 0.01, True, 1)]
)
def test_the_budget_widens_or_narrows_the_interval(slow_sampled, budget, grows, every):
    monitor = HealthMonitor(every_n_steps=every, max_overhead=budget, verbose=False)
    train, _ = patient_loaders()
    slow = _SlowSteps(monitor, 0.03 if slow_sampled else 0.1, sampled=slow_sampled)
    trainer = pl.Trainer(callbacks=[slow, monitor], **trainer_kwargs(max_steps=40))
    trainer.fit(PatientMLP(), train)
    intervals = [v for _, v in monitor.curves("sampling_interval")[""]]
    assert intervals, "the chosen interval is reported"
    if grows:  # sampled steps cost 30 ms more than plain ones: 1% needs a much wider interval
        assert monitor.sampling_interval > 4 and intervals[-1] > 4
    else:  # plain steps take 100 ms and sampling costs a few ms: a 90% budget allows every step
        assert monitor.sampling_interval < 4
