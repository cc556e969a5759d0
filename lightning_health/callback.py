"""``HealthMonitor``: the Lightning glue. The work lives in capture/, pipeline/, diagnosis/ and monitor/.

Data flow of one sampled step::

    on_train_batch_start      arm the hooks (capture/hooks.py) for this optimizer step
    forward/backward          hooks reduce activations and gradients on the device
    on_before_optimizer_step  parameter-gradient norms (after AMP unscaling, before clipping), weights
    on_train_batch_end        pack + one collective + one host copy (monitor/runtime.py), then
                              curves, diagnosis and sinks on the host (monitor/record.py)
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from typing_extensions import override

from lightning_health import settings as check
from lightning_health._compat import CallbackBase, amp_found_inf, grad_scale_tensor, rank_zero
from lightning_health.capture.attention import AttentionSpec, validate_attention_spec
from lightning_health.capture.hooks import Mode
from lightning_health.capture.selection import LayerSpec, validate_layer_spec
from lightning_health.capture.sharding import bind_to_strategy, is_model_parallel
from lightning_health.diagnosis import Finding, Thresholds
from lightning_health.monitor import resume
from lightning_health.monitor.publish import Publisher
from lightning_health.monitor.react import HealthCriticalError, react
from lightning_health.monitor.record import Record
from lightning_health.monitor.runtime import Runtime, StepHost, choose_layers
from lightning_health.monitor.step_end import land_train_step, launch_train_step
from lightning_health.pipeline.history import History
from lightning_health.pipeline.host_copy import Pending
from lightning_health.pipeline.schedule import SamplingSchedule, StepTimer, validate_every_n_steps
from lightning_health.rescue.policy import RescueEvent, RescueMode
from lightning_health.rescue.runner import RescueInit, Rescuer, RescueSettings, warn_refused
from lightning_health.sinks.console import HealthReport, print_report
from lightning_health.sinks.status import status_summary

__all__ = ["HealthCriticalError", "HealthMonitor"]

OnCritical = Literal["warn", "stop", "raise"]
_UNSUPPORTED_STRATEGIES = re.compile(r"fsdp|deepspeed", re.IGNORECASE)


class HealthMonitor(CallbackBase):
    """Reads every monitored layer's activations and gradients every ``every_n_steps`` optimizer steps.

    Args:
        every_n_steps: sampling cadence in optimizer steps (``trainer.global_step``); steps
            ``0, N, 2N, ...`` are read. Steps in between cost no tensor work and no host sync.
        layers: which modules to read. ``None`` selects activation modules (falling back to
            Linear/Conv outputs); or a module type/tuple of types, a regex over qualified names,
            a list of names and/or module types, or a predicate ``(name, module) -> bool``.
        thresholds: when readings become findings (see :class:`~lightning_health.Thresholds`).
        dead_window: how many sampled batches a unit must stay silent in to count as dead.
        histogram_bins: bins of the activation and gradient histograms (even).
        histogram_samples: each histogram is built from a fixed-size strided sample of this many
            values per tensor; every scalar reading stays exact.
        log_histograms: write histograms to loggers that take them (TensorBoard).
        on_critical: when a finding turns critical: ``"warn"`` (print and warn, keep training),
            ``"stop"`` (ask the Trainer to stop gracefully) or ``"raise"``
            (:class:`HealthCriticalError`).
        neuron_dim: override the unit axis (an int for every layer, or ``{layer: dim}``).
        saturation_margin: ``None`` (default): an output is saturated where its activation's slope
            is below 20% of its peak, on a shoulder (probed at setup, see docs/readings.md). A
            fraction keeps the older rule: outputs within that fraction of the output range from a
            shoulder's limit, for activations with a finite range.
        max_points: points kept per curve: when full, every other point goes and the spacing doubles,
            so the whole run stays evenly kept; the run's total is capped at ~1,000,000 points (per-curve
            caps shrink for deep nets; see :mod:`lightning_health.pipeline.history`).
        max_overhead: a budget, as a fraction of training time (e.g. ``0.01``): the monitor times
            its sampled steps against plain ones and widens or narrows the sampling interval to
            stay inside it, starting from ``every_n_steps`` (at 1, the second step is left plain to
            time one; at every step, one step in 50 is). ``None`` keeps the fixed cadence.
        burst_steps: when a finding turns critical (a NaN, an explosion, a layer dying), sample
            every step for this many steps so the moment things broke is recorded in detail.
            ``0`` disables bursts.
        compile_reductions: compute each tensor's totals in one compiled kernel
            (``torch.compile``, float64 accumulation) instead of a few eager passes. Experimental:
            on a CPU it measured slower than the eager reductions and costs a one-off compilation
            and ~70 MiB (see docs/performance.md); it has not been measured on a GPU.
        verbose: print the watched layers at start, critical findings as they appear, and the
            per-layer chart at the end of fit (rank zero only).
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or a log directory to open one in) to
            write the TensorBoard dashboard to directly, with or without a Lightning logger. Pass a
            directory under ``ddp_spawn``: an open writer cannot be pickled to the spawned processes.
        dashboard: write the TensorBoard diagnosis panel (custom scalars), the findings (text in
            TensorBoard, a table in W&B) and the dead-fraction heatmap to loggers that show them.
            Scalars, histograms and the W&B config/summary are written either way.
        heatmap_every_n_samples: re-render the dead-fraction heatmap (layers x sampled steps) and
            the depth profile every this many sampled steps, and once at the end of training;
            ``None`` for neither. A due re-render waits while the pictures would take more than 2%
            of the wall time (dense sampling: a render costs more than a sampled step).
        dormant_threshold: tau of the ``dormant_fraction`` reading (Sokar et al., 2023): a unit is
            dormant when its mean ``|activation|`` over the window is <= tau times the layer's
            average. ``0.025`` (default) also catches nearly silent units of any activation;
            ``0.0`` flags only exactly silent ones (the same as dead, for ReLU); ``None`` turns the
            reading off. See docs/rescue.md.
        rescue: ``None`` (default: only watch), ``"reinit"`` (recycle dead and dormant units:
            fresh incoming weights, zero outgoing weights, their optimizer state reset) or
            ``"leaky"`` (swap a ReLU with dead units for a LeakyReLU). Every event is logged as
            ``health/rescued_units/<layer>`` and listed by :meth:`rescues`.
        rescue_every: rescue on every ``rescue_every``-th sampled step (sampled steps are counted,
            bursts included), for layers whose window is full.
        rescue_init: ``"auto"`` (He for rectifiers, Glorot for tanh/sigmoid), ``"kaiming"`` or ``"xavier"``.
        leaky_slope: the LeakyReLU negative slope for ``rescue="leaky"``.
        rescue_seed: seeds the recycled weights (``rescue_seed + step``), identical on every rank.
        update_ratio_max_bytes: the ``update_ratio`` reading copies the weights it reads before the
            optimizer step (exact for any optimizer); this bounds that copy. Modules that do not fit
            together are read in rotation across sampled steps. ``None``: no bound; ``0``: no
            update ratio (``param_norm`` is read either way). See docs/readings.md.
        update_ratio_sample: a parameter with more values than this is copied on a fresh stratified
            sample of this many (blocks of 16) on each sampled step, and its update's norm estimated
            from it (unbiased; within 2% on dense updates, see docs/readings.md): the copy stays a few
            hundred KiB per parameter instead of the weights. ``None``: copy every value (exact).
        name: names this monitor in checkpoints (its ``state_key``), so two monitors with the same
            ``layers`` can coexist and a resume finds each one's state; ``None`` keys it by ``layers``
            (see :mod:`lightning_health.monitor.resume`).
        attention: read attention entropy / logit maxima of the attention modules and massive
            activations of the residual blocks it recognises (``True``, default), nothing (``False``),
            or also the modules named by ``{name or regex: AttentionSpec(...)}`` (see docs/readings.md).

    Raises:
        TypeError, ValueError: for bad arguments, naming the argument.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> monitor = HealthMonitor(every_n_steps=50)
        >>> trainer = Trainer(callbacks=[monitor], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        *,
        layers: LayerSpec = None,
        thresholds: Thresholds | None = None,
        dead_window: int = 4,
        histogram_bins: int = 64,
        histogram_samples: int = 8192,
        log_histograms: bool = True,
        on_critical: OnCritical = "warn",
        neuron_dim: int | dict[str, int] | None = None,
        saturation_margin: float | None = None,
        max_points: int = 4096,
        max_overhead: float | None = None,
        burst_steps: int = 10,
        compile_reductions: bool = False,
        verbose: bool = True,
        writer: Any = None,
        dashboard: bool = True,
        heatmap_every_n_samples: int | None = 10,
        dormant_threshold: float | None = 0.025,
        rescue: RescueMode | None = None,
        rescue_every: int = 10,
        rescue_init: RescueInit = "auto",
        leaky_slope: float = 0.01,
        rescue_seed: int = 0,
        update_ratio_max_bytes: int | None = 2**29,
        update_ratio_sample: int | None = 65536,
        name: str | None = None,
        attention: bool | Mapping[str, AttentionSpec] = True,
    ) -> None:
        self.name = check.optional_name("name", name)
        self.every_n_steps = validate_every_n_steps(every_n_steps)
        if isinstance(layers, Iterator):  # a generator is read once here and again at set-up
            layers = list(layers)
        validate_layer_spec(layers)
        self.layers = layers
        if thresholds is not None and not isinstance(thresholds, Thresholds):
            raise TypeError(f"Expected `thresholds` to be a lightning_health.Thresholds, got {thresholds!r}")
        self.thresholds = thresholds or Thresholds()
        self.dead_window = check.positive_int("dead_window", dead_window)
        self.histogram_bins = check.even_int("histogram_bins", histogram_bins)
        self.histogram_samples = check.positive_int("histogram_samples", histogram_samples, minimum=16)
        self.log_histograms = check.boolean("log_histograms", log_histograms)
        self.on_critical = check.choice("on_critical", on_critical, check.ON_CRITICAL)
        self.neuron_dim = check.neuron_dim(neuron_dim)
        self.saturation_margin = check.fraction("saturation_margin", saturation_margin, 0, 0.5, optional=True)
        self.max_overhead = check.fraction("max_overhead", max_overhead, 0, 1, optional=True, example=" like 0.01")
        self.burst_steps = check.positive_int("burst_steps", burst_steps, minimum=0)
        self.compile_reductions = check.boolean("compile_reductions", compile_reductions)
        self.verbose = check.boolean("verbose", verbose)
        self.writer = check.writer(writer)
        self.dashboard = check.boolean("dashboard", dashboard)
        self.heatmap_every_n_samples = check.optional_positive_int("heatmap_every_n_samples", heatmap_every_n_samples)
        self.max_points = check.positive_int("max_points", max_points, minimum=16)
        self.rescue_settings = RescueSettings(
            rescue, rescue_every, dormant_threshold, rescue_init, leaky_slope, rescue_seed
        )
        self.update_ratio_max_bytes = check.optional_positive_int("update_ratio_max_bytes", update_ratio_max_bytes, 0)
        self.update_ratio_sample = check.optional_positive_int("update_ratio_sample", update_ratio_sample, 64)
        self.attention = validate_attention_spec(attention)
        # what outlives a fit (checkpointed): curves, findings, windows, schedule, rescues
        self._record = Record(self.thresholds, self.max_points, self.dead_window)
        self._schedule = SamplingSchedule(self.every_n_steps, self.max_overhead, self.burst_steps)
        self._rescuer = Rescuer(self.rescue_settings)
        self._publish = Publisher(self.dashboard, self.heatmap_every_n_samples)
        self._pending_state: dict[str, Any] | None = None  # accumulator windows waiting for the next fit
        self._last_fired_host: dict[str, list[int]] = {}
        self._reset_runtime()

    # -- runtime state (rebuilt in setup; never pickled with the callback) ----------------------------
    def _reset_runtime(self) -> None:
        self._runtime: Runtime | None = None
        self._armed_step: int | None = None
        self._in_flight: tuple[Any, int, Pending[StepHost]] | None = None  # (trainer, step, its host copy on the way)
        self._timer = StepTimer()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_runtime", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_runtime()

    @property
    @override
    def state_key(self) -> str:
        return resume.state_key(self.name, self.layers)

    @override
    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Adopt a state saved under another key (an older version's, or a renamed monitor), with a note."""
        others = [cb.state_key for cb in getattr(trainer, "callbacks", []) if cb is not self]
        note = resume.adopt_old_state(checkpoint, self.state_key, others)
        if note and rank_zero(trainer):
            warnings.warn(note, UserWarning, stacklevel=2)

    # -- public API ------------------------------------------------------------------------------
    @property
    def sampling_interval(self) -> int:
        """The current interval between sampled steps (changes only with ``max_overhead``)."""
        return self._schedule.interval

    @property
    def monitored_layers(self) -> list[str]:
        """Qualified names of the modules being read (empty before fit starts; kept after it ends)."""
        return list(self._record.layers)

    @property
    def _history(self) -> History:
        return self._record.history

    def curves(self, metric: str) -> dict[str, list[tuple[int, float]]]:
        """Every reading of ``metric`` per layer over the whole run, as ``(global_step, value)``."""
        return self._record.history.curves(metric)

    def diagnose(self) -> list[Finding]:
        """Every problem of the run in order of onset, each with its latest state, its peak and a hint."""
        return self._record.findings.findings()

    def rescues(self) -> list[RescueEvent]:
        """Every rescue applied so far (``rescue="reinit"``/``"leaky"``), oldest first."""
        return list(self._rescuer.events)

    def last_fired(self, layer: str) -> list[int]:
        """Per unit of ``layer``, the last sampled step at which it fired (output > 0); ``-1``: never seen firing.

        Raises:
            KeyError: if ``layer`` is not monitored or has not been read yet.
        """
        if self._runtime is not None:
            accumulator = self._runtime.accumulator
            for index, monitored in enumerate(self._runtime.capture.layers):
                if monitored.name == layer and index in accumulator.last_fired:
                    return accumulator.last_fired[index].tolist()
        if layer in self._last_fired_host:
            return list(self._last_fired_host[layer])
        raise KeyError(f"Expected `layer` to be a monitored layer that has been read, got {layer!r}")

    def report(self, title: str = "HealthMonitor") -> HealthReport:
        """The per-layer chart and findings as data (see :mod:`lightning_health.sinks.console`)."""
        history = self._record.history
        names = self.monitored_layers or sorted(self.curves("act_std"))
        latest = {name: history.latest(name) for name in names}
        steps = [pts[-1][0] for m in history.metrics() for pts in self.curves(m).values() if pts]
        return HealthReport.from_latest(title, max(steps, default=0), latest, self.diagnose(), self._record.last_units)

    # -- set-up and tear-down ------------------------------------------------------------------------
    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        strategy = type(getattr(trainer, "strategy", None)).__name__
        if _UNSUPPORTED_STRATEGIES.search(strategy):
            warnings.warn(
                f"HealthMonitor does not support {strategy}: it needs CUDA (Lightning refuses it on CPU), so it has "
                "not been tested here. Sharded training is supported through ModelParallelStrategy (FSDP2 "
                "`fully_shard` and tensor parallel). The monitor stays idle for this run. See docs/distributed.md.",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        if self._runtime is not None:
            return
        self._rescuer.replay(pl_module)  # resumed after `leaky` swaps: the fresh model has ReLU there
        chosen = choose_layers(self, pl_module)
        if not chosen:
            warnings.warn(
                f"HealthMonitor found no layer to monitor with layers={self.layers!r}; it stays idle.",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        runtime = self._runtime = Runtime(self, trainer, pl_module, chosen)
        self._record.bind(chosen)
        sharded = is_model_parallel(getattr(trainer, "strategy", None))
        refused = self._rescuer.bind(pl_module, runtime.capture, runtime.accumulator, sharded)
        if refused and rank_zero(trainer):
            warn_refused(refused, str(self.rescue_settings.rescue))
        if self._pending_state is not None:
            runtime.accumulator.load_state_dict(self._pending_state.get("accumulator", {}))
            self._pending_state = None
        if self.verbose and rank_zero(trainer):
            names = ", ".join(layer.name for layer in chosen[:8]) + (" ..." if len(chosen) > 8 else "")
            print(f"HealthMonitor: reading {len(chosen)} layers every {self.every_n_steps} steps ({names})", flush=True)

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self._runtime is None:
            return
        # configure_model (FSDP2, tensor parallel) has replaced the parameters since setup: collect them now
        self._runtime.bind_parameters(pl_module)
        bind_to_strategy(getattr(trainer, "strategy", None), pl_module, self._runtime.capture)

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._release()

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # Lightning calls only this hook when a fit ends in an exception (or Ctrl+C), never `teardown`:
        # release everything here too, so the next fit re-attaches and writes to its own loggers.
        self._release()

    def _release(self) -> None:
        """Land the step in flight, remove hooks, close the sinks and drop the runtime (safe twice);
        keep curves and windows."""
        try:
            self._land()
        except Exception as err:  # a failing device (the fit's own exception) must not hide the fit's error
            self._in_flight = None
            warnings.warn(f"HealthMonitor could not read its last sampled step ({err}).", RuntimeWarning, stacklevel=2)
        self._rescuer.unbind()
        self._armed_step = None
        runtime, self._runtime = self._runtime, None
        if runtime is None:
            return
        runtime.close()
        accumulator, names = runtime.accumulator, [layer.name for layer in runtime.capture.layers]
        self._last_fired_host = {names[i]: t.tolist() for i, t in accumulator.last_fired.items()}
        self._pending_state = {"accumulator": accumulator.state_dict()}  # for a checkpoint saved after fit

    # -- training --------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        runtime = self._runtime
        if runtime is None:
            return
        self._timer.start(trainer.global_step)
        if self._armed_step is None and self._schedule.should_sample(trainer.global_step):
            self._land()  # its findings may change this step's sampling (a burst)
            self._armed_step = trainer.global_step
            self._timer.mark_sampled()
            runtime.arm(grad_scale_tensor(trainer))
        elif self._armed_step is None:
            runtime.release()  # a plain step: the buffers kept for the next sampled step wait for no close one
        if self._armed_step is not None:
            runtime.capture.new_batch()

    @override
    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._timer.pause()  # a validation pass between two steps is not training time

    @override
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if self._armed_step is not None and self._runtime is not None:
            self._runtime.see_loss(loss)

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._armed_step is not None and self._runtime is not None:
            self._runtime.before_optimizer_step(optimizer, amp_found_inf(trainer, optimizer))

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._in_flight is not None:  # launched a batch ago: its copy is done, the device is busy with this one
            self._land()
        if self._armed_step is not None and trainer.global_step > self._armed_step:
            self._finish_train_step(trainer)

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._armed_step is not None:  # e.g. manual optimization that did not step
            self._finish_train_step(trainer)

    def _finish_train_step(self, trainer: Any) -> None:
        runtime, step = self._runtime, self._armed_step
        assert runtime is not None and step is not None
        self._armed_step = None
        self._land()  # an earlier step first: one copy in flight at most, steps land in order
        pending = launch_train_step(self, runtime, step)
        self._in_flight = (trainer, step, pending)
        if not pending.pending:  # read already (a CPU): its host work now
            self._land()

    def _land(self) -> None:
        """The host side of the step in flight, if any (its copy read, waiting for it if needed)."""
        if self._in_flight is None or self._runtime is None:
            return
        (trainer, step, pending), self._in_flight = self._in_flight, None
        land_train_step(self, trainer, self._runtime, step, pending.land())

    # -- validation ----------------------------------------------------------------------------------
    @override
    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._land()
        if self._runtime is not None and not getattr(trainer, "sanity_checking", False):
            self._runtime.begin_validation()

    @override
    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._runtime is not None and self._runtime.capture.mode is Mode.VAL:
            self._runtime.capture.new_batch()

    @override
    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        runtime = self._runtime
        if runtime is None or runtime.capture.mode is not Mode.VAL:
            return
        results = runtime.end_validation()
        step = trainer.global_step
        scalars, escalated = self._record.validation(step, runtime.capture.layers, results)
        runtime.sinks.write(step, scalars, {})
        react(trainer, escalated, step, self._schedule, self.on_critical, self.verbose)
        if self.dashboard:
            runtime.sinks.findings(step, self.diagnose())

    def settings(self) -> dict[str, Any]:
        """The monitor's settings as plain values (what goes into a W&B run's config)."""
        return check.as_config(self)

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._land()
        if self._runtime is None or not self._runtime.sinks.sinks:
            return
        step, sinks = trainer.global_step, self._runtime.sinks
        self._publish(sinks, self._record, step, final=True)
        curves = self.curves("dead_fraction"), self.curves("nonfinite")
        sinks.finish(step, status_summary(*curves, self.diagnose(), self.monitored_layers))

    @override
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.verbose and rank_zero(trainer) and self._record.history.metrics():
            print_report(self.report())

    # -- checkpoints -------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        self._land()  # a checkpoint holds every sampled step so far
        runtime = self._runtime
        accumulator = (
            runtime.accumulator.state_dict() if runtime else (self._pending_state or {}).get("accumulator", {})
        )
        return {
            **self._record.state_dict(),
            "schedule": self._schedule.state_dict(),
            "every_n_steps": self.every_n_steps,
            "rescues": self._rescuer.state_dict(),
            "accumulator": accumulator,
        }

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._record.load_state_dict(state_dict)
        saved_every = state_dict.get("every_n_steps", self.every_n_steps)
        self._schedule.resume(dict(state_dict.get("schedule", {})), saved_every)
        self._rescuer.load_state_dict(state_dict.get("rescues", {}))  # replays `leaky` swaps when set up
        accumulator_state = state_dict.get("accumulator", {})
        if self._runtime is not None:
            self._runtime.accumulator.load_state_dict(accumulator_state)
        else:
            self._pending_state = {"accumulator": accumulator_state}
