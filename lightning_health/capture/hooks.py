"""Forward hooks on the monitored modules, and tensor hooks for their gradients.

Hooks are registered once when fit starts and removed at teardown (and on exceptions). Between
sampled steps they are gated off by one attribute check, which costs no tensor work and no host
sync; they are not added and removed per step because hooks added after a ``torch.compile``d
model's first call are never seen by the compiled graph.

On a sampled training step each forward hook reduces the module's output on its device (see
:mod:`lightning_health.readings.reductions`) and registers a tensor hook on that output, which reduces the
gradient of the loss with respect to it during backward (capturing gradients this way, instead of
with module backward hooks, is safe with inplace activations). No activation is kept beyond its
reduction: only fixed-size totals, per-unit fire masks and sample histograms stay on the device.

During validation the hooks only OR-accumulate per-unit fire masks, which is exactly what the
validation dead fraction needs.

``torch.compile``: the hook body runs under ``torch.compiler.disable``, so Dynamo never traces the
reductions or guards on the monitor's Python state (call slots, buffers), which would otherwise
recompile the user's model on later sampled steps. A hooked module becomes a graph break; measured
with torch 2.13 (tests/test_reliability.py), a run compiles once and never recompiles after.
"""

from __future__ import annotations

import dataclasses
import enum
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_health.capture.histograms import ACT, GRAD, StepHistograms
from lightning_health.capture.selection import MonitoredLayer, activation_profile
from lightning_health.capture.sharding import ShardPlan, local_tensor
from lightning_health.readings import kernels
from lightning_health.readings import reductions as R
from lightning_health.readings.collapse import unit_moments
from lightning_health.readings.dormancy import unit_abs_sums, unit_counts


class Mode(enum.Enum):
    """What the hooks do right now."""

    OFF = "off"
    TRAIN = "train"
    VAL = "val"


@dataclasses.dataclass
class StepBuffers:
    """What one layer gathered during the current sampled step (all on the layer's device)."""

    act: Tensor | None = None
    grad: Tensor | None = None
    act_hist: Tensor | None = None
    grad_hist: Tensor | None = None
    fired: dict[int, Tensor] = dataclasses.field(default_factory=dict)  # call slot -> bool[units]
    calls: int = 0  # forward calls in the current micro-batch (the slot of the next call)
    abs_sums: dict[int, Tensor] = dataclasses.field(default_factory=dict)  # slot -> float64[units] (dormancy)
    abs_counts: dict[int, int] = dataclasses.field(default_factory=dict)  # slot -> values per unit summed
    grad_task: int | None = None  # the autograd pass whose gradient this micro-batch reads (the first)
    moments: dict[int, Tensor] = dataclasses.field(default_factory=dict)  # slot -> float64[2 * units] (collapse)
    moment_counts: dict[int, int] = dataclasses.field(default_factory=dict)  # slot -> values per unit summed

    def clear(self) -> None:
        self.grad_task = None
        self.act = self.grad = self.act_hist = self.grad_hist = None
        self.fired = {}
        self.calls = 0
        self.abs_sums = {}
        self.abs_counts = {}
        self.moments = {}
        self.moment_counts = {}


def first_tensor(output: Any) -> Tensor | None:
    """The first floating-point tensor in a module output (tensor, tuple, list, dict, or model output)."""
    if isinstance(output, Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, Mapping):
        items: Sequence[Any] = list(output.values())
    elif isinstance(output, (tuple, list)):
        items = output
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        items = [getattr(output, f.name) for f in dataclasses.fields(output)]
    else:
        return None
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def dense_values(t: Tensor) -> Tensor:
    """A nested tensor's values as one dense ``(values, features)`` tensor; a dense tensor as it is.

    ``nn.TransformerEncoder`` turns a padded batch into a nested tensor on its eval fast path
    (``src_key_padding_mask`` given, no grad): the modules of its layers then see only the real
    tokens, which is what is read (padding is never counted).
    """
    if not t.is_nested:
        return t
    if t.layout == torch.jagged:
        values = t.values()
        return values.reshape(-1, values.shape[-1]) if values.dim() else values.reshape(1, 1)
    parts = [p.reshape(-1, p.shape[-1]) if p.dim() else p.reshape(1, 1) for p in t.unbind()]
    return torch.cat(parts) if parts else t.new_zeros(0, 0)


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. activation checkpointing recomputes a forward)."""
    return torch._C._current_graph_task_id() != -1


class _ForwardHook:
    """The forward hook of one monitored module.

    A model copied or pickled while the hooks are attached (``copy.deepcopy`` by an EMA/SWA
    callback, ``torch.save(model)``) gets an inert hook: the copy never feeds this run's readings,
    and pickling does not fail on a closure.
    """

    __slots__ = ("capture", "index")

    def __init__(self, capture: Capture | None, index: int) -> None:
        self.capture = capture
        self.index = index

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.capture is not None:
            self.capture._hook(self.index, output)

    def __reduce__(self) -> tuple[type, tuple[None, int]]:
        return (type(self), (None, -1))


class _InputHook(_ForwardHook):
    """A forward pre-hook: reads the module's first input (a functional activation's output)."""

    __slots__ = ()

    def __call__(self, module: torch.nn.Module, args: Any) -> None:  # type: ignore[override]
        if self.capture is not None and args:
            self.capture._hook(self.index, args[0])


class Capture:
    """Owns the hooks on the monitored modules and the per-step device buffers they fill.

    Args:
        layers: the modules to read, from :func:`lightning_health.capture.selection.select_layers`.
        act_edges: histogram edges per layer name for activations (``None``: no histograms).
        grad_edges: histogram edges for activation gradients (shared by all layers).
        histogram_samples: the strided sample size each histogram is built from.
        saturation_margin: ``None``: an output is saturated where its activation's slope is below
            20% of its peak (:attr:`~lightning_health.capture.profile.ActivationProfile.saturation`);
            a fraction: within that fraction of the output range from a shoulder's limit.
        compile_reductions: compute the activation and gradient totals with the fused kernels of
            :mod:`lightning_health.readings.kernels` instead of eager ops.
    """

    def __init__(
        self,
        layers: Sequence[MonitoredLayer],
        act_edges: Mapping[str, Tensor] | None,
        grad_edges: Tensor | None,
        histogram_samples: int,
        saturation_margin: float | None,
        compile_reductions: bool = False,
    ) -> None:
        self.layers = list(layers)
        self.buffers = [StepBuffers() for _ in self.layers]
        self.mode = Mode.OFF
        self.grad_scale: Tensor | None = None  # AMP loss scale to divide activation gradients by
        self.forward_order: dict[int, None] = {}  # layer indices in the order of their first call
        self.act_edges = dict(act_edges) if act_edges is not None else None
        self.grad_edges = grad_edges
        self.histograms = StepHistograms(act_edges, grad_edges, histogram_samples)
        self._margin = saturation_margin
        self._compiled = compile_reductions
        self._thresholds: dict[tuple[int, torch.device], Tensor] = {}  # fused-kernel saturation thresholds
        self.scratch = R.Scratch()  # one reused temporary per device for the eager reductions
        self._handles: list[RemovableHandle] = []
        self._broken: set[int] = set()
        self.reported: set[int] = set()  # layers that got a reading in the current pass (cleared by reset)
        self.dropped: set[int] = set()  # layers that never reported in the first sampled steps (hooks kept)
        self._ever_read: set[int] = set()
        self._settled_passes = 0
        self.track_abs = False  # also sum |activation| per unit on training steps (dormancy readings)
        self.shards = ShardPlan()  # tensor parallel: units laid out across ranks (capture/sharding.py)
        self.track_moments = True  # per-unit sum and sum of squares on training steps (collapse reading)
        # layer -> its outputs' autograd nodes since the last backward, recorded on training passes until
        # the heads are found (capture/heads.py); ``None`` once they are
        self.head_nodes: dict[int, list[Any]] | None = {}

    # -- lifetime -------------------------------------------------------------------------------
    def attach(self) -> None:
        """Register one forward hook per monitored module (idempotent)."""
        if self._handles:
            return
        for index, layer in enumerate(self.layers):
            self._handles.append(self._register(index, layer))

    def _register(self, index: int, layer: MonitoredLayer) -> RemovableHandle:
        if layer.read_input:
            return layer.module.register_forward_pre_hook(_InputHook(self, index))
        return layer.module.register_forward_hook(self._make_hook(index))

    def detach(self) -> None:
        """Remove every hook; safe to call any number of times."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.scratch.clear()
        self.mode = Mode.OFF

    def replace(self, index: int, module: torch.nn.Module) -> None:
        """Read ``module`` instead of layer ``index``'s module (after the model swapped it), hook included."""
        old = self.layers[index]
        self.layers[index] = dataclasses.replace(old, module=module, profile=activation_profile(module))
        self._thresholds = {k: v for k, v in self._thresholds.items() if k[0] != index}
        if self._handles:
            self._handles[index].remove()
            self._handles[index] = self._register(index, self.layers[index])

    def reset(self) -> None:
        """Forget everything gathered (start of a sampled step or of a validation pass)."""
        for buf in self.buffers:
            buf.clear()
        self.histograms.clear()
        self.reported = set()

    SETTLE_AFTER = 2
    """Sampled training steps after which a layer that never reported is dropped."""

    def settle(self, read: set[int]) -> tuple[list[str], list[str]]:
        """Count one sampled training step in which (on any rank) the layers ``read`` were read.

        After :attr:`SETTLE_AFTER` such steps, a layer never read in any of them is set aside: it
        leaves the reports (its names are returned once, as the first list), but its hook stays, so
        a branch taken later (a rarely routed expert, a head switched on mid-run) comes back the
        first time it reports (its names are the second list). Such silent modules exist: ``out_proj``
        of an attention module selected by hand, a branch the model never takes. ``read`` should
        come from the synced readings, so every rank sets aside and takes back the same layers.
        """
        self._ever_read |= read
        back = sorted(i for i in read if i in self.dropped)
        self.dropped -= set(back)
        self._settled_passes += 1
        silent = []
        if self._settled_passes == self.SETTLE_AFTER:
            silent = [i for i in range(len(self.layers)) if i not in self._ever_read and i not in self.dropped]
            self.dropped |= set(silent)
        return [self.layers[i].name for i in silent], [self.layers[i].name for i in back]

    def new_batch(self) -> None:
        """Restart call-slot numbering: the k-th call of a module in each batch shares slot k."""
        for buf in self.buffers:
            buf.calls = 0
            buf.grad_task = None

    # -- hooks ------------------------------------------------------------------------------------
    def _make_hook(self, index: int) -> Any:
        return _ForwardHook(self, index)

    @torch.compiler.disable  # eager inside a compiled model: dynamo never guards on the monitor's state
    def _hook(self, index: int, output: Any) -> None:
        if self.mode is Mode.OFF or index in self._broken:
            return
        self._guarded(index, "layer", self._on_forward, output)

    @torch.compiler.disable  # eager even inside a compiled model: nothing here may enter its graph
    def _guarded(self, index: int, what: str, read: Any, value: Any) -> None:
        """Run one reading; on error stop reading that layer with a warning, never crash the run."""
        try:
            read(index, value)
        except Exception as err:  # a fault in a user's model must never crash the run
            self._broken.add(index)
            warnings.warn(
                f"lightning_health stopped reading {what} `{self.layers[index].name}` after an error "
                f"({type(err).__name__}: {err}); training continues.",
                RuntimeWarning,
                stacklevel=3,
            )

    @torch.compiler.disable  # eager even inside a compiled model (see the module docstring)
    def _on_forward(self, index: int, output: Any) -> None:
        y = first_tensor(output)
        if y is None:
            return
        if y.is_nested:
            y = self._nested(index, y)
            if y is None:
                return
        layer, buf = self.layers[index], self.buffers[index]
        slot = buf.calls
        buf.calls += 1
        if index in self.shards.silent:  # replicated across the tensor-parallel group: another rank reports it
            if self.mode is Mode.TRAIN:
                self.forward_order.setdefault(index)
            return
        dim = layer.neuron_dim if y.dim() >= 3 else -1
        recomputing = _in_backward()  # activation checkpointing: this forward was already read
        if self.mode is Mode.TRAIN and y.requires_grad and torch.is_grad_enabled():
            y.register_hook(self._make_grad_hook(index))  # on a DTensor itself: its local part is not in the graph
            if self.head_nodes is not None and not recomputing:
                self.head_nodes.setdefault(index, []).append(y.grad_fn)
        y = local_tensor(y)
        if recomputing:
            return
        if y.numel() == 0:  # no example, no evidence about any unit (the width is agreed later in DDP)
            return
        training = self.mode is not Mode.VAL
        moments = self._unit_readings(index, slot, y, dim) if training else None
        fired = self.shards.place(index, self._fired(index, y, dim, moments))
        prev = buf.fired.get(slot)
        buf.fired[slot] = fired if prev is None or prev.shape != fired.shape else prev | fired
        self.reported.add(index)
        if not training:
            return
        self.forward_order.setdefault(index)  # a dict: O(1) on the hook path, keeps first-call order
        totals = self._activation_totals(index, y, moments)
        buf.act = totals if buf.act is None else R.combine_activation_totals(buf.act, totals)
        if self.act_edges is not None:
            self.histograms.take(ACT, index, layer.name, y)

    def _fired(self, index: int, y: Tensor, dim: int, moments: Tensor | None) -> Tensor:
        """Which units output > 0: from the per-unit sums when the activation is never negative
        (a sum of values >= 0 is > 0 exactly when one is), else one more pass over ``y``."""
        if moments is not None and self.layers[index].profile.range[0] >= 0:
            return R.fired_from_sums(moments[: moments.numel() // 2])
        return R.unit_fire_mask(y, dim)

    def _unit_readings(self, index: int, slot: int, y: Tensor, dim: int) -> Tensor | None:
        """Accumulate the per-unit sums (moments for collapse, ``|y|`` for dormancy); this call's moments.

        An activation whose output is never negative (its probed range starts at 0 or above: ReLU,
        sigmoid, softplus) has ``|y| = y``: its ``|y|`` sums are the moments' sums, not another pass.
        """
        buf = self.buffers[index]
        moments = None
        if self.track_moments:
            moments, prev_moments = unit_moments(y, dim, scratch=self.scratch.get(y)), buf.moments.get(slot)
            same = prev_moments is not None and prev_moments.shape == moments.shape
            buf.moments[slot] = prev_moments + moments if same else moments  # type: ignore[operator]
            buf.moment_counts[slot] = (buf.moment_counts[slot] if same else 0) + unit_counts(y, dim)
        if self.track_abs:
            if moments is not None and self.layers[index].profile.range[0] >= 0:
                sums = self.shards.place(index, moments[: moments.numel() // 2])
            else:
                sums = self.shards.place(index, unit_abs_sums(y, dim, scratch=self.scratch.get(y)))
            prev_sums = buf.abs_sums.get(slot)
            same = prev_sums is not None and prev_sums.shape == sums.shape
            buf.abs_sums[slot] = prev_sums + sums if same else sums  # type: ignore[operator]
            count = unit_counts(y, dim) if self.shards.counts_units(index) else 0
            buf.abs_counts[slot] = (buf.abs_counts[slot] if same else 0) + count
        return moments

    def _nested(self, index: int, y: Tensor) -> Tensor | None:
        """A nested output's values (see :func:`dense_values`), gradients included; ``None``: skip this call."""
        try:
            values = dense_values(y)
        except Exception:  # an unusual nested layout: skip this call, keep the layer
            return None
        if self.mode is Mode.TRAIN and y.requires_grad and torch.is_grad_enabled():
            y.register_hook(self._make_grad_hook(index))
        return values.detach()

    def _activation_totals(self, index: int, y: Tensor, moments: Tensor | None = None) -> Tensor:
        """``moments``: this call's per-unit moments, whose totals spare the eager path its two moment passes."""
        thresholds = self.layers[index].profile.saturation_thresholds(self._margin)
        if not self._compiled:
            sums = None if moments is None else moments.view(2, -1).sum(dim=1)
            return R.activation_totals(y, scratch=self.scratch.get(y), thresholds=thresholds, moments=sums)
        key = (index, y.device)
        if key not in self._thresholds:
            self._thresholds[key] = kernels.threshold_vector(thresholds, y.device)
        return kernels.activation_totals(y, self._thresholds[key])

    def _make_grad_hook(self, index: int) -> Any:
        def grad_hook(grad: Tensor) -> None:
            if index not in self._broken:
                self._guarded(index, "gradients of", self._on_grad, grad)

        return grad_hook

    def _on_grad(self, index: int, grad: Tensor) -> None:
        buf = self.buffers[index]
        # Per micro-batch, only the first backward pass that reaches a layer is read: with several
        # optimizers in one manual step, a later loss's backward is not this layer's gradient.
        task = torch._C._current_graph_task_id()
        if buf.grad_task is None:
            buf.grad_task = task
        elif task != buf.grad_task:
            return
        g = dense_values(local_tensor(grad.detach()))
        if self.grad_scale is not None:
            g = g.float() / self.grad_scale.to(g.device)
        totals = kernels.gradient_totals(g) if self._compiled else R.gradient_totals(g, scratch=self.scratch.get(g))
        buf.grad = totals if buf.grad is None else R.combine_gradient_totals(buf.grad, totals)
        if self.grad_edges is not None:
            self.histograms.take(GRAD, index, None, g)

    def bin_histograms(self) -> None:
        """Bin the step's histogram samples (all at once) into each layer's ``act_hist``/``grad_hist``
        (the counts already sum a layer's calls; binned once per step, a second call finds none)."""
        for (kind, index), counts in self.histograms.counts().items():
            if kind == ACT:
                self.buffers[index].act_hist = counts
            else:
                self.buffers[index].grad_hist = counts
