"""``HealthMonitor``: the Lightning glue. The maths lives in reductions/accumulate/diagnosis.

Data flow of one sampled step::

    on_train_batch_start   arm the hooks (capture.py) for this optimizer step
    forward/backward       hooks reduce activations and gradients on the device
    on_before_optimizer_step  parameter-gradient norms (after AMP unscaling, before clipping)
    on_train_batch_end     pack + one collective + one host copy (accumulate.py),
                           then history, diagnosis and sinks on the host
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from typing_extensions import override

from lightning_health import resume
from lightning_health import settings as check
from lightning_health._compat import CallbackBase, amp_found_inf, grad_scale_tensor, rank_zero
from lightning_health.capture.attention import AttentionSpec, validate_attention_spec
from lightning_health.capture.hooks import Capture, Mode, StepBuffers
from lightning_health.capture.selection import (
    LayerSpec,
    MonitoredLayer,
    check_names_exist,
    select_layers,
    validate_layer_spec,
)
from lightning_health.capture.sharding import bind_to_strategy, is_model_parallel
from lightning_health.capture.transformer import TransformerCapture
from lightning_health.diagnosis import Finding, FindingLog, GradBaseline, Thresholds, evaluate
from lightning_health.pipeline import transformer_step
from lightning_health.pipeline.accumulate import Accumulator, LayerReading, ParamGradNorms, layer_param_groups
from lightning_health.pipeline.history import History
from lightning_health.pipeline.learning import UpdateTracker, UpdateWindow, fold_learning
from lightning_health.pipeline.schedule import SamplingSchedule, validate_every_n_steps
from lightning_health.readings import reductions as R
from lightning_health.rescue.policy import RescueEvent, RescueMode
from lightning_health.rescue.runner import RescueInit, Rescuer, RescueSettings, warn_refused
from lightning_health.sinks import Histogram, SinkSet, sinks_for
from lightning_health.sinks.console import HealthReport, print_report
from lightning_health.sinks.heatmap import render_heatmap
from lightning_health.sinks.status import status_scalars, status_summary

OnCritical = Literal["warn", "stop", "raise"]
_UNSUPPORTED_STRATEGIES = re.compile(r"fsdp|deepspeed", re.IGNORECASE)
HEATMAP_TAG = "health/dead_fraction_heatmap"
# Histogram magnitudes (symlog edges): wide enough that an explosion stays on the chart; what lies beyond
# is logged as health/act_out_of_range, health/grad_out_of_range.
ACT_EDGE_RANGE, GRAD_EDGE_RANGE = (1e-4, 1e30), (1e-9, 1e30)
UNIT_FRACTIONS = ("dead_fraction", "alive_fraction", "dormant_fraction", "collapsed_fraction")
"""Per-unit shares that mean nothing for a layer with NaN/Inf outputs: logged as NaN there."""


class HealthCriticalError(RuntimeError):
    """Raised by ``HealthMonitor(on_critical="raise")`` when a finding turns critical."""


class HealthMonitor(CallbackBase):
    """Reads every monitored layer's activations and gradients every ``every_n_steps`` optimizer steps.

    Args:
        every_n_steps: sampling cadence in optimizer steps (``trainer.global_step``); steps
            ``0, N, 2N, ...`` are read. Steps in between cost no tensor work and no host sync.
        layers: which modules to read. ``None`` selects activation modules (falling back to
            Linear/Conv outputs); or a module type/tuple of types, a regex over qualified names,
            a list of names, or a predicate ``(name, module) -> bool``.
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
            stay inside it, starting from ``every_n_steps``. ``None`` keeps the fixed cadence.
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
        heatmap_every_n_samples: re-render the dead-fraction heatmap (layers x sampled steps) every
            this many sampled steps, and once at the end of training; ``None`` for no heatmap.
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
        name: names this monitor in checkpoints (its ``state_key``), so two monitors with the same
            ``layers`` can coexist and a resume finds each one's state; ``None`` keys it by ``layers``
            (see :mod:`lightning_health.resume`).
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
        name: str | None = None,
        attention: bool | Mapping[str, AttentionSpec] = True,
    ) -> None:
        self.name = check.optional_name("name", name)
        self.every_n_steps = validate_every_n_steps(every_n_steps)
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
        self._schedule = SamplingSchedule(self.every_n_steps, self.max_overhead, self.burst_steps)
        self.verbose = check.boolean("verbose", verbose)
        self.writer = check.writer(writer)
        self.dashboard = check.boolean("dashboard", dashboard)
        self.heatmap_every_n_samples = check.optional_positive_int("heatmap_every_n_samples", heatmap_every_n_samples)
        self._history = History(check.positive_int("max_points", max_points, minimum=16))
        self._findings = FindingLog()
        self._grad_baseline = GradBaseline(self.thresholds.baseline_samples)  # scale-free explosion rule
        self._last_units: dict[str, tuple[int | None, int]] = {}
        self._layer_names: list[str] = []
        self._pending_state: dict[str, Any] | None = None
        self.rescue_settings = RescueSettings(
            rescue, rescue_every, dormant_threshold, rescue_init, leaky_slope, rescue_seed
        )
        self._rescuer = Rescuer(self.rescue_settings)
        self._last_fired_host: dict[str, list[int]] = {}
        self.update_ratio_max_bytes = check.optional_positive_int("update_ratio_max_bytes", update_ratio_max_bytes, 0)
        self._update_window = UpdateWindow(self.dead_window)
        self.attention = validate_attention_spec(attention)
        self._reset_runtime()

    # -- runtime state (rebuilt in setup; never pickled with the callback) ----------------------------
    def _reset_runtime(self) -> None:
        self._capture: Capture | None = None
        self._accumulator: Accumulator | None = None
        self._sinks = SinkSet([])
        self._param_groups: list[tuple[str, list[torch.nn.Parameter]]] = []
        self._param_norm_reader = ParamGradNorms([])
        self._updates = UpdateTracker([], 0)
        self._param_norms: torch.Tensor | None = None
        self._amp_overflow: torch.Tensor | None = None  # GradScaler found inf/NaN: this step is skipped
        self._armed_step: int | None = None
        self._rectifiers: set[str] = set()  # hard-zero side: the `dead` rule
        self._smooth: set[str] = set()  # smooth off side: the `inactive` rule
        # optimizer-step timing, for the overhead budget: (step, start time, was it sampled)
        self._timed: tuple[int, float, bool] | None = None
        self._sampled_seconds = math.nan
        self._idle_seconds = math.nan
        self._host_edges: dict[str, tuple[float, ...]] = {}
        self._samples_published = 0
        self._train_buffers: list[StepBuffers] | None = None  # a training step's buffers during validation
        self._norms_read: tuple[bool, ...] = ()  # param groups whose gradient norm this step already read
        self._norm_masks: dict[Any, torch.Tensor] = {}  # (groups to take, device) -> bool mask, made once
        self._transformer: TransformerCapture | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in (
            "_capture",
            "_accumulator",
            "_sinks",
            "_param_groups",
            "_param_norm_reader",
            "_updates",
            "_param_norms",
            "_host_edges",
            "_train_buffers",
            "_norm_masks",
            "_transformer",
        ):
            state.pop(key, None)
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
        states = checkpoint.get("callbacks") or {}
        others = [cb.state_key for cb in getattr(trainer, "callbacks", []) if cb is not self]
        key, candidates = resume.old_state(states, self.state_key, others)
        if key is not None:
            states[self.state_key] = states[key]  # Lightning then passes it to load_state_dict
            message = f"HealthMonitor: resuming the monitor state saved under {key!r} (now {self.state_key!r})"
        elif candidates:
            message = (
                f"HealthMonitor: no state under {self.state_key!r} and several monitor states in the checkpoint "
                f"({candidates}); starting afresh. Pass the same `name=` as the saved monitor to resume it"
            )
        else:
            return
        if rank_zero(trainer):
            warnings.warn(message, UserWarning, stacklevel=2)

    # -- public API ------------------------------------------------------------------------------
    @property
    def sampling_interval(self) -> int:
        """The current interval between sampled steps (changes only with ``max_overhead``)."""
        return self._schedule.interval

    @property
    def monitored_layers(self) -> list[str]:
        """Qualified names of the modules being read (empty before fit starts; kept after it ends)."""
        return list(self._layer_names)

    def curves(self, metric: str) -> dict[str, list[tuple[int, float]]]:
        """Every reading of ``metric`` per layer over the whole run, as ``(global_step, value)``."""
        return self._history.curves(metric)

    def diagnose(self) -> list[Finding]:
        """Every problem of the run in order of onset, each with its latest state and a hint."""
        return self._findings.findings()

    def rescues(self) -> list[RescueEvent]:
        """Every rescue applied so far (``rescue="reinit"``/``"leaky"``), oldest first."""
        return list(self._rescuer.events)

    def last_fired(self, layer: str) -> list[int]:
        """Per unit of ``layer``, the last sampled step at which it fired (output > 0); ``-1``: never seen firing.

        Raises:
            KeyError: if ``layer`` is not monitored or has not been read yet.
        """
        if self._capture is not None and self._accumulator is not None:
            for index, monitored in enumerate(self._capture.layers):
                if monitored.name == layer and index in self._accumulator.last_fired:
                    return self._accumulator.last_fired[index].tolist()
        if layer in self._last_fired_host:
            return list(self._last_fired_host[layer])
        raise KeyError(f"Expected `layer` to be a monitored layer that has been read, got {layer!r}")

    def report(self, title: str = "HealthMonitor") -> HealthReport:
        """The per-layer chart and findings as data (see :mod:`lightning_health.sinks.console`)."""
        names = self.monitored_layers or sorted(self.curves("act_std"))
        latest = {name: self._history.latest(name) for name in names}
        steps = [pts[-1][0] for m in self._history.metrics() for pts in self.curves(m).values() if pts]
        return HealthReport.from_latest(title, max(steps, default=0), latest, self.diagnose(), self._last_units)

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
        if self._capture is not None:
            return
        self._rescuer.replay(pl_module)  # resumed after `leaky` swaps: the fresh model has ReLU there
        if not isinstance(self.layers, (str, type, tuple)) and isinstance(self.layers, Iterable):
            check_names_exist("layers", self.layers, pl_module)
        if isinstance(self.neuron_dim, dict):
            check_names_exist("neuron_dim", self.neuron_dim, pl_module)
        chosen = select_layers(pl_module, self.layers, self.neuron_dim)
        if not chosen:
            warnings.warn(
                f"HealthMonitor found no layer to monitor with layers={self.layers!r}; it stays idle.",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        act_edges = self._activation_edges(chosen) if self.log_histograms else None
        grad_edges = R.symlog_edges(self.histogram_bins, *GRAD_EDGE_RANGE) if self.log_histograms else None
        # Host copies of the fixed edges, made once (edges are built on the CPU: no device transfer).
        self._host_edges = {f"act:{name}": tuple(e.tolist()) for name, e in (act_edges or {}).items()}
        if grad_edges is not None:
            self._host_edges["grad"] = tuple(grad_edges.tolist())
        self._capture = Capture(
            chosen,
            act_edges=act_edges,
            grad_edges=grad_edges,
            histogram_samples=self.histogram_samples,
            saturation_margin=self.saturation_margin,
            compile_reductions=self.compile_reductions,
        )
        self._accumulator = Accumulator(
            self._capture,
            self.dead_window,
            self.rescue_settings.dormant_threshold,
            collapse_ratio=self.thresholds.collapse_unit_ratio,
        )
        self._findings = (
            FindingLog([layer.name for layer in chosen]) if not self._findings.findings() else self._findings
        )
        self._rectifiers = {layer.name for layer in chosen if layer.profile.can_die}
        self._smooth = {layer.name for layer in chosen if layer.profile.off_side == "smooth"}
        self._layer_names = [layer.name for layer in chosen]
        self._param_groups = layer_param_groups([(n, m) for n, m in pl_module.named_modules() if n])
        self._param_norm_reader = ParamGradNorms(self._param_groups)
        self._updates = UpdateTracker(self._param_groups, self.update_ratio_max_bytes)
        if self._updates.too_large and rank_zero(trainer):
            warnings.warn(
                f"HealthMonitor reads no update_ratio for {', '.join(self._updates.too_large)}: larger than "
                f"`update_ratio_max_bytes` ({self.update_ratio_max_bytes}); raise it to read them.",
                RuntimeWarning,
                stacklevel=2,
            )
        if rank_zero(trainer):
            self._sinks = SinkSet(sinks_for(getattr(trainer, "loggers", []), writer=self.writer))
            self._sinks.start(self.settings(), [layer.name for layer in chosen])
        self._capture.attach()
        sharded = is_model_parallel(getattr(trainer, "strategy", None))
        refused = self._rescuer.bind(pl_module, self._capture, self._accumulator, sharded)
        if self.attention:
            specs = self.attention if isinstance(self.attention, dict) else None
            self._transformer = TransformerCapture(pl_module, specs) or None
            if self._transformer is not None:
                self._transformer.attach()
        if refused and rank_zero(trainer):
            warn_refused(refused, str(self.rescue_settings.rescue))
        if self._pending_state is not None:
            self._accumulator.load_state_dict(self._pending_state.get("accumulator", {}))
            self._pending_state = None
        if self.verbose and rank_zero(trainer):
            names = ", ".join(layer.name for layer in chosen[:8]) + (" ..." if len(chosen) > 8 else "")
            print(f"HealthMonitor: reading {len(chosen)} layers every {self.every_n_steps} steps ({names})", flush=True)

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self._capture is None:
            return
        # configure_model (FSDP2, tensor parallel) has replaced the parameters since setup: collect them now
        self._param_groups = layer_param_groups([(n, m) for n, m in pl_module.named_modules() if n])
        self._param_norm_reader = ParamGradNorms(self._param_groups)
        bind_to_strategy(getattr(trainer, "strategy", None), pl_module, self._capture)

    def _activation_edges(self, chosen: list[MonitoredLayer]) -> dict[str, torch.Tensor]:
        edges = {}
        for layer in chosen:
            bounds = layer.profile.bounds
            if bounds is not None:
                edges[layer.name] = R.linear_edges(self.histogram_bins, *bounds)
            else:
                edges[layer.name] = R.symlog_edges(self.histogram_bins, *ACT_EDGE_RANGE)
        return edges

    def _stop_capture(self) -> None:
        if self._transformer is not None:
            self._transformer.detach()
        if self._capture is not None:
            self._capture.detach()
            self._capture.reset()
        self._updates.discard()
        self._armed_step = None

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._release()

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # Lightning calls only this hook when a fit ends in an exception (or Ctrl+C), never `teardown`:
        # release everything here too, so the next fit re-attaches and writes to its own loggers.
        self._release()

    def _release(self) -> None:
        """Remove hooks, close the sinks and drop the runtime (safe twice); keep history and windows."""
        self._stop_capture()
        self._rescuer.unbind()
        if self._capture is not None and self._accumulator is not None:
            names = [layer.name for layer in self._capture.layers]
            self._last_fired_host = {names[i]: t.tolist() for i, t in self._accumulator.last_fired.items()}
        if self._accumulator is not None:  # keep the windows for a checkpoint saved after fit
            self._pending_state = {"accumulator": self._accumulator.state_dict()}
        self._capture = None
        self._accumulator = None
        self._transformer = None
        self._sinks.close()
        self._sinks = SinkSet([])
        self._param_groups = []
        self._param_norms = None
        self._train_buffers = None

    # -- training --------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        capture = self._capture
        if capture is None:
            return
        self._time_step(trainer.global_step)
        if self._armed_step is None and self._schedule.should_sample(trainer.global_step):
            self._armed_step = trainer.global_step
            if self._timed is not None:
                self._timed = (self._timed[0], self._timed[1], True)
            capture.reset()
            capture.grad_scale = grad_scale_tensor(trainer)
            capture.mode = Mode.TRAIN
            if self._transformer is not None:
                self._transformer.reset()
                self._transformer.armed = True
        if self._armed_step is not None:
            capture.new_batch()

    def _time_step(self, step: int) -> None:
        """Time optimizer steps start to start; a sampled step's time includes the monitor's work."""
        if self._timed is not None and self._timed[0] == step:
            return  # another micro-batch of the same optimizer step
        now = time.perf_counter()
        if self._timed is not None and step == self._timed[0] + 1 and self._timed[0] > 0:  # step 0 is warm-up
            seconds = now - self._timed[1]
            if self._timed[2]:
                self._sampled_seconds = seconds
            else:
                idle = self._idle_seconds
                self._idle_seconds = seconds if math.isnan(idle) else 0.8 * idle + 0.2 * seconds
        self._timed = (step, now, False)

    @override
    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._timed = None  # a validation pass between two steps is not training time

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._armed_step is None or self._capture is None:
            return
        self._amp_overflow = amp_found_inf(trainer, optimizer)
        if self._param_groups:
            self._read_param_norms(optimizer)
            self._updates.before_step()  # weights before the update: clipping touches only gradients

    def _read_param_norms(self, optimizer: Any) -> None:
        """Each module's parameter-gradient norm, read before the first step of an optimizer that owns it.

        With several optimizers in one step (manual optimization, GAN-style), a later backward adds to
        the gradients of modules an earlier optimizer already stepped: those must keep their first reading.
        """
        ids = {id(p) for group in getattr(optimizer, "param_groups", []) for p in group["params"]}
        owned = tuple(not ids or any(id(p) in ids for p in params) for _name, params in self._param_groups)
        device = self._param_groups[0][1][0].device
        if self._param_norms is None:
            self._param_norms, self._norms_read = self._param_norm_reader(device), owned
            return
        take = tuple(o and not r for o, r in zip(owned, self._norms_read))
        if not any(take):
            return
        mask = self._norm_masks.get((take, device))
        if mask is None:
            mask = self._norm_masks[(take, device)] = torch.tensor(take, dtype=torch.bool, device=device)
        self._param_norms = torch.where(mask, self._param_norm_reader(device), self._param_norms)
        self._norms_read = tuple(r or t for r, t in zip(self._norms_read, take))

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._armed_step is not None and trainer.global_step > self._armed_step:
            self._finish_train_step(trainer)

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._armed_step is not None:  # e.g. manual optimization that did not step
            self._finish_train_step(trainer)

    def _finish_train_step(self, trainer: Any) -> None:
        capture, accumulator, step = self._capture, self._accumulator, self._armed_step
        assert capture is not None and accumulator is not None and step is not None
        capture.mode = Mode.OFF
        self._armed_step = None
        if self._transformer is not None:
            self._transformer.armed = False
        timing = None
        if self.max_overhead is not None:  # synced with max so every rank picks the same interval
            device = accumulator.device()
            timing = torch.empty(2, dtype=torch.float64, device=device)
            timing[0], timing[1] = self._sampled_seconds, self._idle_seconds  # fills, no host-to-device copy
        has_norms, has_overflow = self._param_norms is not None, self._amp_overflow is not None
        learning, read = self._updates.after_step()  # after optimizer.step: before any rescue moves weights
        extra = [t for t in (self._param_norms, learning, self._amp_overflow) if t is not None]  # one transfer
        device = accumulator.device()
        try:
            readings, extra_host, shared = accumulator.finish_train_step(
                torch.cat([t.to(device, torch.float64).reshape(-1) for t in extra]) if extra else None,
                transformer_step.share(timing, self._transformer, device),
                step=step,
            )
        finally:
            capture.reset()
            self._param_norms, self._norms_read = None, ()
        overflow = has_overflow and extra_host[-1] > 0
        norms = extra_host[: len(self._param_groups)] if has_norms else []
        learning_host = extra_host[len(norms) : len(norms) + (0 if learning is None else learning.numel())]
        self._amp_overflow = None
        shared, attention_host = transformer_step.split(shared, self._transformer)
        scalars, histograms, snapshot = self._tabulate(step, readings, capture)
        if self._transformer is not None:
            transformer_step.publish(
                self._transformer, attention_host, step, self._history, scalars, histograms, snapshot
            )
        scalars.update(self._rescue(trainer, step))
        for (name, _params), value in zip(self._param_groups, norms):
            scalars[f"health/param_grad_norm/{name}"] = value
            self._history.add(step, "param_grad_norm", name, value)
        if shared:
            self._schedule.after_sample(step, shared[0], shared[1])
            scalars["health/sampling_interval"] = float(self._schedule.interval)
            self._history.add(step, "sampling_interval", "", float(self._schedule.interval))
        if overflow:
            # The loss scale overflowed and the scaler skips this step: infinite gradients are AMP
            # working as designed. Log it, and keep the gradient rules out of this step's diagnosis.
            scalars["health/amp_skipped_step"] = 1.0
            for readings_of_layer in snapshot.values():
                for key in ("grad_std", "grad_max", "grad_norm", "grad_nonfinite"):
                    readings_of_layer.pop(key, None)
        order = [capture.layers[i].name for i in capture.forward_order]
        step_learning = self._updates.readings(learning_host, read) if learning is not None else {}
        names = [name for name, _params in self._param_groups]
        for metric, values in fold_learning(
            step_learning, list(zip(names, norms)), self._update_window, snapshot, order, overflow
        ).items():
            for name, value in values.items():
                scalars[f"health/{metric}/{name}"] = value
                self._history.add(step, metric, name, value)
        with_grad = [name for name in order if "grad_std" in snapshot.get(name, {})]
        found, checked = evaluate(
            step,
            snapshot,
            self.thresholds,
            rectifiers=self._rectifiers,
            output_layer=with_grad[-1] if with_grad else None,
            window=self.dead_window,
            smooth_rectifiers=self._smooth,
            layer_order=order,
            baseline=self._grad_baseline,
        )
        self._settle(trainer, capture, readings)
        escalated = self._findings.record(found, checked, step)
        if self._sinks.sinks:  # the status line, from this step's readings and the live findings
            scalars.update(status_scalars(snapshot, self.diagnose(), histograms))
        self._sinks.write(step, scalars, histograms)
        self._react(trainer, escalated, step)
        self._publish(step)

    def _tabulate(
        self, step: int, readings: list[LayerReading], capture: Capture
    ) -> tuple[dict[str, float], dict[str, Histogram], dict[str, dict[str, float]]]:
        """Readings -> logged scalars, histograms, and the snapshot the diagnosis reads."""
        scalars: dict[str, float] = {}
        histograms: dict[str, Histogram] = {}
        snapshot: dict[str, dict[str, float]] = {}
        for layer, reading in zip(capture.layers, readings):
            metrics = dict(reading.metrics)
            if reading.dead_units is not None and reading.units:
                metrics["dead_fraction"] = reading.dead_units / reading.units
                self._last_units[layer.name] = (reading.dead_units, reading.units)
            if reading.dormant_units is not None and reading.units:
                metrics["dormant_fraction"] = reading.dormant_units / reading.units
            if reading.alive_fraction is not None:
                metrics["alive_fraction"] = reading.alive_fraction
            if reading.collapsed_fraction is not None:
                metrics["collapsed_fraction"] = reading.collapsed_fraction
            if not metrics:
                continue
            if metrics.get("nonfinite", 0) > 0:  # NaN/Inf outputs: no unit is measurably dead, alive or constant
                for key in UNIT_FRACTIONS:
                    if key in metrics or key == "dead_fraction":
                        metrics[key] = math.nan
            for metric, value in metrics.items():
                scalars[f"health/{metric}/{layer.name}"] = value
                self._history.add(step, metric, layer.name, value)
            snapshot[layer.name] = dict(metrics)
            if reading.dead_units is not None:
                snapshot[layer.name].update(dead_units=reading.dead_units, units=reading.units)
            if reading.act_hist is not None:
                edges = self._host_edges[f"act:{layer.name}"]
                histograms[f"health/activations/{layer.name}"] = Histogram(edges, tuple(reading.act_hist))
            if reading.grad_hist is not None:
                histograms[f"health/gradients/{layer.name}"] = Histogram(
                    self._host_edges["grad"], tuple(reading.grad_hist)
                )
        return scalars, histograms, snapshot

    def _rescue(self, trainer: Any, step: int) -> dict[str, float]:
        """Apply the rescue on a due step, on every rank (the masks are synced); the scalars to log."""
        if not self._rescuer.due():
            return {}
        events, skipped = self._rescuer.apply(step, list(getattr(trainer, "optimizers", [])))
        for event in events:
            self._history.add(step, "rescued_units", event.layer, float(len(event.units)))
            if event.action == "leaky":
                self._rectifiers.discard(event.layer)
                self._smooth.discard(event.layer)
        if rank_zero(trainer):
            for name in skipped:
                warnings.warn(
                    f"HealthMonitor does not rescue `{name}`: it is called more than once per forward, so its units' "
                    "evidence mixes several uses",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if self.verbose:
                for event in events:
                    print(f"HealthMonitor: rescue at {event}", flush=True)
        return Rescuer.scalars(events)

    def _settle(self, trainer: Any, capture: Capture, readings: list[LayerReading]) -> None:
        """Drop the layers no rank has read in the first sampled steps, with one note (see Capture.settle)."""
        read = {i for i, r in enumerate(readings) if r.metrics or r.dead_units is not None}
        dropped = capture.settle(read)
        if not dropped:
            return
        self._layer_names = [name for name in self._layer_names if name not in dropped]
        self._rectifiers -= set(dropped)
        self._smooth -= set(dropped)
        if rank_zero(trainer):
            warnings.warn(
                f"HealthMonitor: {', '.join(f'`{n}`' for n in dropped)} never ran in the first "
                f"{capture.SETTLE_AFTER} sampled steps and will not be read (a module whose weights are used "
                "by a functional call, or a branch the model does not take).",
                RuntimeWarning,
                stacklevel=2,
            )

    # -- validation ----------------------------------------------------------------------------------
    @override
    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self._capture is None or getattr(trainer, "sanity_checking", False):
            return
        capture = self._capture
        if capture.mode is Mode.TRAIN:  # validation inside an optimizer step (val_check_interval with accumulation)
            self._train_buffers = capture.buffers  # the step's readings so far: kept aside, restored after
            capture.buffers = [StepBuffers() for _ in capture.layers]
        capture.reset()
        capture.mode = Mode.VAL

    @override
    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._capture is not None and self._capture.mode is Mode.VAL:
            self._capture.new_batch()

    @override
    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        capture, accumulator = self._capture, self._accumulator
        if capture is None or accumulator is None or capture.mode is not Mode.VAL:
            return
        capture.mode = Mode.OFF
        try:
            results = accumulator.finish_validation()
        finally:
            capture.reset()
            if self._train_buffers is not None:  # back to the interrupted training step
                capture.buffers, self._train_buffers = self._train_buffers, None
                capture.mode = Mode.TRAIN
        step = trainer.global_step
        scalars: dict[str, float] = {}
        snapshot: dict[str, dict[str, float]] = {}
        for layer, (dead, units) in zip(capture.layers, results):
            if not units:
                continue
            nonfinite = self._history.latest(layer.name).get("nonfinite")
            value = math.nan if nonfinite else dead / units  # a NaN layer's silence is not death
            scalars[f"health/val_dead_fraction/{layer.name}"] = value
            self._history.add(step, "val_dead_fraction", layer.name, value)
            snapshot[layer.name] = {"val_dead_fraction": value, "dead_units": dead, "units": units}
            if nonfinite:
                snapshot[layer.name]["nonfinite"] = nonfinite
        self._sinks.write(step, scalars, {})
        found, checked = evaluate(
            step, snapshot, self.thresholds, rectifiers=self._rectifiers, smooth_rectifiers=self._smooth
        )
        self._react(trainer, self._findings.record(found, checked, step), step)
        if self.dashboard:
            self._sinks.findings(step, self.diagnose())

    # -- reacting and reporting ------------------------------------------------------------------------
    def _react(self, trainer: Any, escalated: list[Finding], step: int) -> None:
        critical = [f for f in escalated if f.severity == "critical"]
        if not critical:
            return
        lines = "\n".join(f"  {f}\n    hint: {f.hint}" for f in critical)
        burst = self._schedule.start_burst(step)
        if rank_zero(trainer) and self.verbose:
            more = f"\n  sampling every step until step {self._schedule.burst_until}" if burst else ""
            print(f"HealthMonitor: critical finding(s) at step {step}:\n{lines}{more}", flush=True)
        if self.on_critical == "raise":
            raise HealthCriticalError(f"critical health finding(s) at step {step}:\n{lines}")
        if self.on_critical == "stop":
            trainer.should_stop = True
            if rank_zero(trainer):
                print(f"HealthMonitor: stopping the run at step {step} (on_critical='stop').", flush=True)
        elif rank_zero(trainer):
            warnings.warn(f"critical health finding(s) at step {step}:\n{lines}", RuntimeWarning, stacklevel=2)

    # -- dashboards -----------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The monitor's settings as plain values (what goes into a W&B run's config)."""
        return {
            "name": self.name,
            "every_n_steps": self.every_n_steps,
            "layers_spec": resume.stable_layers_repr(self.layers),
            "dead_window": self.dead_window,
            "histogram_bins": self.histogram_bins,
            "histogram_samples": self.histogram_samples,
            "log_histograms": self.log_histograms,
            "on_critical": self.on_critical,
            "saturation_margin": self.saturation_margin,
            "max_overhead": self.max_overhead,
            "burst_steps": self.burst_steps,
            "compile_reductions": self.compile_reductions,
            "thresholds": dataclasses.asdict(self.thresholds),
            "dashboard": self.dashboard,
            "heatmap_every_n_samples": self.heatmap_every_n_samples,
            "update_ratio_max_bytes": self.update_ratio_max_bytes,
            "attention": self.attention if isinstance(self.attention, bool) else repr(self.attention),
            **dataclasses.asdict(self.rescue_settings),
        }

    def _publish(self, step: int, final: bool = False) -> None:
        """Findings (when they changed) and, every so often, the heatmap; no work without a sink for them."""
        if not self.dashboard or not self._sinks.sinks:
            return
        self._sinks.findings(step, self.diagnose(), force=final)
        self._samples_published += not final
        every = self.heatmap_every_n_samples
        if every and self._sinks.takes_images and (final or self._samples_published % every == 0):
            curves = self.curves("dead_fraction")
            if curves:
                nonfinite = self.curves("nonfinite")
                self._sinks.image(step, HEATMAP_TAG, render_heatmap(curves, self.monitored_layers, nonfinite=nonfinite))
            self._publish_profile(step)

    def _publish_profile(self, step: int) -> None:
        """The gradient-flow picture (needs matplotlib, the `plot` extra; skipped without it)."""
        from lightning_health.sinks.depth_profile import MATPLOTLIB_AVAILABLE, PROFILE_TAG, depth_profile_rgb

        curves = {metric: self.curves(metric) for metric in ("grad_norm", "act_rms")}
        if MATPLOTLIB_AVAILABLE and curves["grad_norm"]:
            self._sinks.image(step, PROFILE_TAG, depth_profile_rgb(curves, self.monitored_layers))

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._sinks.sinks:
            return
        step = trainer.global_step
        self._publish(step, final=True)
        curves = self.curves("dead_fraction"), self.curves("nonfinite")
        self._sinks.finish(step, status_summary(*curves, self.diagnose(), self.monitored_layers))

    @override
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.verbose and rank_zero(trainer) and self._history.metrics():
            print_report(self.report())

    # -- checkpoints -------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self._history.state_dict(),
            "findings": self._findings.state_dict(),
            "grad_baseline": self._grad_baseline.state_dict(),
            "last_units": {k: list(v) for k, v in self._last_units.items()},
            "layers": list(self._layer_names),
            "schedule": self._schedule.state_dict(),
            "every_n_steps": self.every_n_steps,
            "rescues": self._rescuer.state_dict(),
            "update_window": self._update_window.state_dict(),
            "accumulator": (
                self._accumulator.state_dict()
                if self._accumulator is not None
                else (self._pending_state or {}).get("accumulator", {})
            ),
        }

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._history.load_state_dict(state_dict.get("history", {}))
        self._findings.load_state_dict(state_dict.get("findings", []))
        self._grad_baseline.load_state_dict(state_dict.get("grad_baseline", {}))
        self._last_units = {k: (v[0], v[1]) for k, v in state_dict.get("last_units", {}).items()}
        self._layer_names = self._layer_names or list(state_dict.get("layers", []))
        saved_every = state_dict.get("every_n_steps", self.every_n_steps)
        schedule = dict(state_dict.get("schedule", {}))
        if saved_every != self.every_n_steps:  # a changed cadence: history carries over, the new cadence rules
            warnings.warn(
                f"HealthMonitor: resuming a run sampled every {saved_every} steps with every_n_steps="
                f"{self.every_n_steps}; its history carries over and sampling continues at the new cadence",
                UserWarning,
                stacklevel=2,
            )
            schedule = {"burst_until": schedule.get("burst_until", -1)}
        self._schedule.load_state_dict(schedule)
        self._rescuer.load_state_dict(state_dict.get("rescues", {}))  # replays `leaky` swaps when set up
        self._update_window.load_state_dict(state_dict.get("update_window", {}))
        accumulator_state = state_dict.get("accumulator", {})
        if self._accumulator is not None:
            self._accumulator.load_state_dict(accumulator_state)
        else:
            self._pending_state = {"accumulator": accumulator_state}
