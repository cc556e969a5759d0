"""The host side of a sampled training step, in the order it must happen.

launch: collect (the one collective, the one host copy started); then land, once the copy is read
(at once on a CPU, a training batch later on CUDA): tabulate (readings -> logged values) ->
transformer and rescue extras -> the sampling budget -> learning readings and the depth profile ->
diagnose -> set aside layers that never report (or take back one that came) -> write the sinks ->
react to critical findings -> the dashboard pieces. ``callback.py`` calls :func:`launch_train_step`
once per sampled step, after the optimizer step (or at the end of an epoch that did not step), and
:func:`land_train_step` when its host numbers are read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lightning_health._compat import rank_zero
from lightning_health.monitor.react import react
from lightning_health.monitor.rescue_step import rescue_step
from lightning_health.pipeline import transformer_step
from lightning_health.sinks.status import status_scalars

if TYPE_CHECKING:
    from lightning_health.callback import HealthMonitor
    from lightning_health.monitor.runtime import Runtime, StepHost
    from lightning_health.pipeline.host_copy import Pending


def step_timing(monitor: HealthMonitor, runtime: Runtime) -> torch.Tensor | None:
    """(sampled, plain) step seconds for the overhead budget, maxed across ranks so all pick one interval."""
    if monitor.max_overhead is None:
        return None
    timing = torch.empty(2, dtype=torch.float64, device=runtime.accumulator.device())
    timing[0], timing[1] = monitor._timer.sampled_seconds, monitor._timer.idle_seconds  # fills, no host copy
    return timing


def launch_train_step(monitor: HealthMonitor, runtime: Runtime, step: int) -> Pending[StepHost]:
    """The device side of a sampled step's end: pack, the one collective, the one host copy started.

    The copy is read at once on a CPU, or when a rescue may move weights this step; on CUDA it is
    read a training batch later (:func:`land_train_step`), so the device never waits for the host.
    """
    defer = None if monitor.rescue_settings.rescue is None else False
    return runtime.collect(step, step_timing(monitor, runtime), defer)


def land_train_step(monitor: HealthMonitor, trainer: Any, runtime: Runtime, step: int, host: StepHost) -> None:
    """Everything a sampled step leaves to do on the host, from its host numbers to the sinks."""
    record, capture, schedule = monitor._record, runtime.capture, monitor._schedule
    record.heads = set(runtime.heads)
    scalars, histograms, snapshot = record.tabulate(step, host.readings, capture, runtime.host_edges)
    if runtime.transformer is not None:
        transformer_step.publish(
            runtime.transformer, host.attention, step, record.history, scalars, histograms, snapshot
        )
    scalars.update(rescue_step(monitor._rescuer, record, trainer, step, monitor.verbose))
    if host.timing:
        schedule.after_sample(step, host.timing[0], host.timing[1])
        record.add(step, {"sampling_interval": {"": float(schedule.interval)}}, scalars)
    if host.overflow:
        record.skip_gradients(snapshot, scalars)
    order = [capture.layers[i].name for i in capture.forward_order]
    grad_norms = list(zip([name for name, _params in runtime.groups], host.grad_norms))
    record.learning(step, host.learning, grad_norms, snapshot, order, host.overflow, scalars)
    escalated = record.diagnose(step, snapshot, order)
    dropped, back = runtime.settle(host, rank_zero(trainer))
    record.drop(dropped)
    record.restore(back, capture.layers)
    if runtime.sinks.sinks:  # the status line, from this step's readings and the live findings
        scalars.update(status_scalars(snapshot, monitor.diagnose(), histograms))
    runtime.sinks.write(step, scalars, histograms)
    react(trainer, escalated, step, schedule, monitor.on_critical, monitor.verbose)
    monitor._publish(runtime.sinks, record, step)
