"""The objects of one fit: built in ``setup``, dropped at its end or on a crash.

A :class:`Runtime` holds the hooks on the user's modules, the accumulator of the step's totals, the
sinks of the current Trainer's loggers and the parameter readers. Nothing here is pickled with the
callback (ddp_spawn) or checkpointed: a new fit builds a new runtime, so it is always monitored and
always writes to its own loggers, whatever the previous fit did.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_health._compat import rank_zero
from lightning_health.capture.fullgraph import WHY_LEFT_OUT, fullgraph_modules
from lightning_health.capture.heads import output_heads
from lightning_health.capture.hooks import Capture, Mode, StepBuffers
from lightning_health.capture.selection import MonitoredLayer, check_names_exist, select_layers
from lightning_health.capture.transformer import TransformerCapture
from lightning_health.monitor.param_norms import StepParamNorms
from lightning_health.pipeline import transformer_step
from lightning_health.pipeline.accumulate import Accumulator, LayerReading
from lightning_health.pipeline.host_copy import Pending
from lightning_health.pipeline.learning import UpdateTracker
from lightning_health.pipeline.param_grads import layer_param_groups
from lightning_health.readings import reductions as R
from lightning_health.sinks import SinkSet, sinks_for

if TYPE_CHECKING:
    from lightning_health.callback import HealthMonitor

# Histogram magnitudes (symlog edges): wide enough that an explosion stays on the chart; what lies beyond
# is logged as health/act_out_of_range, health/grad_out_of_range.
ACT_EDGE_RANGE, GRAD_EDGE_RANGE = (1e-4, 1e30), (1e-9, 1e30)


@dataclasses.dataclass
class StepHost:
    """One sampled step's numbers on the host, after the one collective and the one transfer."""

    readings: list[LayerReading]
    grad_norms: list[float]  # per parameter group, in `Runtime.groups` order; [] when no optimizer stepped
    learning: dict[str, dict[str, float]]  # {module: {"param_norm", "update_ratio"}}
    overflow: bool  # the GradScaler found inf/NaN and skips this optimizer step
    timing: list[float]  # (sampled seconds, idle seconds) maxed over ranks, with `max_overhead`
    attention: list[float]  # the transformer readings' host numbers


def activation_edges(chosen: list[MonitoredLayer], bins: int) -> dict[str, Tensor]:
    """Fixed histogram edges per layer: linear over a bounded activation's range, else symlog."""
    edges = {}
    for layer in chosen:
        bounds = layer.profile.bounds
        if bounds is not None:
            edges[layer.name] = R.linear_edges(bins, *bounds)
        else:
            edges[layer.name] = R.symlog_edges(bins, *ACT_EDGE_RANGE)
    return edges


def choose_layers(monitor: HealthMonitor, pl_module: Any) -> list[MonitoredLayer]:
    """The monitored layers, after one-line checks of the names the user gave."""
    if not isinstance(monitor.layers, (str, type, tuple)) and isinstance(monitor.layers, Iterable):
        check_names_exist("layers", [n for n in monitor.layers if isinstance(n, str)], pl_module)
    if isinstance(monitor.neuron_dim, dict):
        check_names_exist("neuron_dim", monitor.neuron_dim, pl_module)
    chosen = select_layers(pl_module, monitor.layers, monitor.neuron_dim)
    compiled = fullgraph_modules(pl_module)
    left_out = [layer.name for layer in chosen if id(layer.module) in compiled]
    if left_out:
        warnings.warn(
            f"HealthMonitor leaves out {', '.join(f'`{n}`' for n in left_out)}: {WHY_LEFT_OUT}. Compile "
            "without fullgraph=True to read them.",
            UserWarning,
            stacklevel=3,
        )
    return [layer for layer in chosen if id(layer.module) not in compiled]


class Runtime:
    """Hooks, accumulator, sinks and parameter readers of one fit (see the module docstring)."""

    def __init__(self, monitor: HealthMonitor, trainer: Any, pl_module: Any, chosen: list[MonitoredLayer]) -> None:
        bins = monitor.histogram_bins
        self.heads: list[str] = []  # the model's output layers, once found (capture/heads.py)
        self._heads_found: set[int] | None = None  # layer indices found so far in the first sampled step
        act_edges = activation_edges(chosen, bins) if monitor.log_histograms else None
        grad_edges = R.symlog_edges(bins, *GRAD_EDGE_RANGE) if monitor.log_histograms else None
        # Host copies of the fixed edges, made once (edges are built on the CPU: no device transfer).
        self.host_edges = {f"act:{name}": tuple(e.tolist()) for name, e in (act_edges or {}).items()}
        if grad_edges is not None:
            self.host_edges["grad"] = tuple(grad_edges.tolist())
        self.capture = Capture(
            chosen,
            act_edges=act_edges,
            grad_edges=grad_edges,
            histogram_samples=monitor.histogram_samples,
            saturation_margin=monitor.saturation_margin,
            compile_reductions=monitor.compile_reductions,
        )
        self.accumulator = Accumulator(
            self.capture,
            monitor.dead_window,
            monitor.rescue_settings.dormant_threshold,
            collapse_ratio=monitor.thresholds.collapse_unit_ratio,
        )
        self.max_bytes = monitor.update_ratio_max_bytes
        self.update_sample = monitor.update_ratio_sample
        self.bind_parameters(pl_module)
        self.sinks = SinkSet([])
        if rank_zero(trainer):
            self.sinks = SinkSet(sinks_for(getattr(trainer, "loggers", []), writer=monitor.writer))
            self.sinks.start(monitor.settings(), [layer.name for layer in chosen])
            if self.updates.too_large:
                warnings.warn(
                    f"HealthMonitor reads no update_ratio for {', '.join(self.updates.too_large)}: larger than "
                    f"`update_ratio_max_bytes` ({self.max_bytes}); raise it to read them.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        self.capture.attach()
        self.transformer: TransformerCapture | None = None
        if monitor.attention:
            specs = monitor.attention if isinstance(monitor.attention, dict) else None
            found = TransformerCapture(pl_module, specs, skip=fullgraph_modules(pl_module))
            if found.left_out:
                warnings.warn(
                    f"HealthMonitor reads no attention from {', '.join(f'`{n}`' for n in found.left_out)}: "
                    f"{WHY_LEFT_OUT}.",
                    UserWarning,
                    stacklevel=3,
                )
            if found.unrecognised:
                warnings.warn(
                    f"HealthMonitor reads no attention entropy or logits from {', '.join(found.unrecognised)}: not a "
                    "recognised attention module (nn.MultiheadAttention, GPT-2, BERT, Llama-style, GPT-NeoX, "
                    "DistilBERT, T5, Falcon). Modules with separate query/key projections and no rotary embedding "
                    "can be registered with `attention={name: AttentionSpec(...)}`; every other reading is unaffected.",
                    UserWarning,
                    stacklevel=3,
                )
            self.transformer = found or None
            if self.transformer is not None:
                self.transformer.attach()
        self.amp_overflow: Tensor | None = None  # GradScaler found inf/NaN: this step is skipped
        self._train_buffers: list[StepBuffers] | None = None  # a training step's buffers during validation

    def bind_parameters(self, pl_module: Any) -> None:
        """Collect the modules' parameters (again after ``configure_model`` replaced them: FSDP2, TP)."""
        self.groups = layer_param_groups([(n, m) for n, m in pl_module.named_modules() if n])
        self.norms = StepParamNorms(self.groups)
        self.updates = UpdateTracker(self.groups, self.max_bytes, self.update_sample)

    def arm(self, grad_scale: Tensor | None) -> None:
        """Read the coming forward and backward passes."""
        self.capture.reset()
        self.capture.grad_scale = grad_scale
        self.capture.mode = Mode.TRAIN
        if self.transformer is not None:
            self.transformer.reset()
            self.transformer.armed = True

    def see_loss(self, loss: Any) -> None:
        """Before each backward of a sampled step, until the heads are known: the monitored layers
        that this loss reaches through no trained weight (see :mod:`~lightning_health.capture.heads`)."""
        nodes = self.capture.head_nodes
        if nodes is None or not nodes or not isinstance(loss, Tensor):
            return
        try:
            self._heads_found = (self._heads_found or set()) | output_heads(loss, nodes)
        except Exception:  # an unusual graph: no heads from it, the rules judge those layers as before
            self._heads_found = self._heads_found or set()
        nodes.clear()  # held only until this backward: they keep its graph alive

    def _settle_heads(self) -> None:
        """At the end of a sampled step that saw a backward, the heads are known for the rest of the fit."""
        capture = self.capture
        if capture.head_nodes is None:
            return
        capture.head_nodes = {}  # drop what no backward hook walked (e.g. a bare loss.backward())
        if self._heads_found is not None:
            self.heads = [capture.layers[i].name for i in sorted(self._heads_found)]
            capture.head_nodes = None

    def before_optimizer_step(self, optimizer: Any, overflow: Tensor | None) -> None:
        """Gradient norms and the weights before the update (clipping touches only gradients)."""
        self.amp_overflow = overflow
        if self.groups:
            self.norms.read(optimizer)
            self.updates.before_step(optimizer)

    def collect(self, step: int, timing: Tensor | None, defer: bool | None = None) -> Pending[StepHost]:
        """Pack every reading, run the one collective, start the one host copy; the host numbers to come.

        Args:
            step: the global step of the readings.
            timing: the sampling budget's step timings, or ``None``.
            defer: read the host copy later (``None``: on CUDA only; see
                :class:`~lightning_health.pipeline.host_copy.HostCopy`).
        """
        capture, accumulator = self.capture, self.accumulator
        capture.mode = Mode.OFF
        self._settle_heads()
        if self.transformer is not None:
            self.transformer.armed = False
        norms, overflow = self.norms.take(), self.amp_overflow
        self.amp_overflow = None
        learning, read = self.updates.after_step()  # after optimizer.step: before any rescue moves weights
        extra = [t for t in (norms, learning, overflow) if t is not None]  # one transfer
        device = accumulator.device()
        shared_sum, shared_max = transformer_step.share(timing, self.transformer, device)
        summed = 0 if shared_sum is None else shared_sum.numel()
        maxed = 0 if self.transformer is None or not self.transformer else self.transformer.width() - summed
        try:
            landing = accumulator.launch_train_step(
                torch.cat([t.to(device, torch.float64).reshape(-1) for t in extra]) if extra else None,
                shared_max,
                step=step,
                defer=defer,
                shared_sum=shared_sum,
            )
        finally:
            capture.reset()
        n_norms = len(self.groups) if norms is not None else 0
        n_learning = 0 if learning is None else learning.numel()

        def land() -> StepHost:
            readings, extra_host, shared = landing.land()
            learning_host = extra_host[n_norms : n_norms + n_learning]
            cut = len(shared) - maxed  # [summed, timing, maxed]
            return StepHost(
                readings,
                extra_host[:n_norms],
                self.updates.readings(learning_host, read) if learning is not None else {},
                overflow is not None and extra_host[-1] > 0,
                shared[summed:cut],
                shared[:summed] + shared[cut:],
            )

        return Pending(landing.copy, land)

    def settle(self, host: StepHost, lead: bool) -> tuple[list[str], list[str]]:
        """Layers set aside (never read in the first sampled steps) and taken back (read after all), with notes."""
        read = {i for i, r in enumerate(host.readings) if r.metrics or r.dead_units is not None}
        dropped, back = self.capture.settle(read)
        if dropped and lead:
            warnings.warn(
                f"HealthMonitor: {', '.join(f'`{n}`' for n in dropped)} never ran in the first "
                f"{self.capture.SETTLE_AFTER} sampled steps and is left out of the reports (a module whose weights "
                "are used by a functional call, or a branch the model does not take); it comes back if it runs.",
                RuntimeWarning,
                stacklevel=3,
            )
        if back and lead:
            warnings.warn(
                f"HealthMonitor: {', '.join(f'`{n}`' for n in back)} ran after all; reading it again.",
                RuntimeWarning,
                stacklevel=3,
            )
        return dropped, back

    def begin_validation(self) -> None:
        """Read a validation pass; a training step it interrupts keeps its readings for after it."""
        capture = self.capture
        if capture.mode is Mode.TRAIN:  # validation inside an optimizer step (val_check_interval with accumulation)
            self._train_buffers = capture.buffers
            capture.buffers = [StepBuffers() for _ in capture.layers]
        capture.reset()
        capture.mode = Mode.VAL

    def end_validation(self) -> list[tuple[int, int]]:
        """``(dead units, units)`` per layer over the whole pass; back to an interrupted training step."""
        capture = self.capture
        capture.mode = Mode.OFF
        try:
            return self.accumulator.finish_validation()
        finally:
            capture.reset()
            if self._train_buffers is not None:
                capture.buffers, self._train_buffers = self._train_buffers, None
                capture.mode = Mode.TRAIN

    def release(self) -> None:
        """Drop what consecutive sampled steps reuse (the update ratio's copies, the reductions'
        scratch): after a plain step the next sampled one is not close, and plain steps hold nothing."""
        self.updates.release()
        self.capture.scratch.clear()

    def stop(self) -> None:
        """Remove every hook and drop a half-read step (safe twice)."""
        if self.transformer is not None:
            self.transformer.detach()
        self.capture.detach()
        self.capture.reset()
        self.updates.discard()
        self.norms.take()

    def close(self) -> None:
        """Stop reading and close the sinks (the end of the fit, or a crash)."""
        self.stop()
        self.sinks.close()
