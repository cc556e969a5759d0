"""Treatments for dead and dormant units: recycle their weights (ReDo), or swap the activation.

Recycling (Sokar et al., "The Dormant Neuron Phenomenon in Deep Reinforcement Learning", ICML
2023) gives a dead unit fresh *incoming* weights, so it fires again, and zeroes its *outgoing*
weights, so what the network computes does not change at the moment of the reset: the unit used to
contribute ``w_out * 0`` and now contributes ``0 * a``. The optimizer's per-element state (Adam's
moments, SGD's momentum, ...) of exactly those weights is cleared, so stale statistics of a frozen
unit do not steer its new weights; every other weight and state entry is left bit-identical.

A unit is an output row (Linear) or out-channel (Conv) of the layer feeding the activation, and an
input column (Linear) or in-channel (Conv) of the layer consuming it. :func:`find_units_weights`
finds the two layers for an activation inside ``nn.Sequential`` chains; for other models, pass the
layers to :func:`reinit_dead_units` yourself.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> opt = torch.optim.Adam(net.parameters())
    >>> w = find_units_weights(net, "1")
    >>> (w.layer_in_name, w.layer_out_name)
    ('0', '2')
    >>> dead = torch.zeros(8, dtype=torch.bool)
    >>> dead[:3] = True
    >>> reinit_dead_units(w.layer_in, w.layer_out, dead, optimizer=opt, norms=w.norms)
    3
    >>> replace_activation(net, nn.ReLU, lambda: nn.LeakyReLU(0.01))
    ['1']
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

InitName = Literal["kaiming", "xavier"]
UnitLayer = nn.Linear | _ConvNd  # the layers whose rows/channels are units: Linear, Conv1d/2d/3d

# Modules that act on each unit separately and keep the unit axis: a chain may pass through them.
_UNITWISE = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
_INITS = ("kaiming", "xavier")
# torch.nn.modules.activation classes that are not unit-wise: they mix or split the unit axis.
_MIXING_ACTIVATIONS = (nn.MultiheadAttention, nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.GLU)
# Third-party elementwise activations (transformers' GELUActivation, timm's GELU, ...), by class name.
_ACTIVATION_NAME = re.compile(r"(relu|gelu|silu|swish|mish|tanh|sigmoid|softplus|selu|celu|elu|hardswish)")


def _is_unitwise(module: nn.Module) -> bool:
    """True for modules that act on each unit separately and keep the unit axis."""
    if isinstance(module, _UNITWISE):
        return True
    if isinstance(module, _MIXING_ACTIVATIONS):
        return False
    if type(module).__module__ == nn.modules.activation.__name__:
        return True
    is_leaf = next(module.children(), None) is None
    return is_leaf and bool(_ACTIVATION_NAME.search(type(module).__name__.lower()))


@dataclass(frozen=True)
class UnitWeights:
    """The weights that own one activation's units, as found by :func:`find_units_weights`.

    Attributes:
        activation_name: qualified name of the activation module.
        layer_in_name: qualified name of the Linear/Conv whose output rows/channels are the units.
        layer_in: that layer.
        layer_out_name: qualified name of the Linear/Conv that consumes the units.
        layer_out: that layer.
        norm_names: qualified names of BatchNorm layers between the two, in forward order.
        norms: those layers; :func:`reinit_dead_units` resets their entries for the units too.
    """

    activation_name: str
    layer_in_name: str
    layer_in: UnitLayer
    layer_out_name: str
    layer_out: UnitLayer
    norm_names: tuple[str, ...] = ()
    norms: tuple[_BatchNorm, ...] = ()


def _is_plain_sequential(module: nn.Module) -> bool:
    """An nn.Sequential whose forward is Sequential's own: its children run in registration order."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _chain(model: nn.Module, name: str) -> tuple[list[tuple[str, nn.Module]], int]:
    """The forward-ordered leaves of the outermost nn.Sequential that holds ``name``, and its index."""
    parts = name.split(".")
    path = [model]
    for part in parts:
        path.append(getattr(path[-1], part))
    # Climb while the ancestors are Sequential: their order is the forward order.
    depth = len(parts) - 1  # index in `path` of the direct parent
    if not _is_plain_sequential(path[depth]):
        kind = type(path[depth]).__name__
        parent = ".".join(parts[:-1]) or "<model>"
        raise ValueError(
            f"Cannot map the units of `{name}` to weights: its parent `{parent}` ({kind}) is not an nn.Sequential "
            "with Sequential's own forward, so the order of its forward pass is unknown. Pass the feeding and "
            "consuming layers to `reinit_dead_units(layer_in, layer_out, mask)` yourself."
        )
    while depth > 0 and _is_plain_sequential(path[depth - 1]):
        depth -= 1
    prefix = ".".join(parts[:depth])

    def leaves(module: nn.Module, qual: str) -> Iterable[tuple[str, nn.Module]]:
        if _is_plain_sequential(module):
            for child_name, child in module.named_children():
                yield from leaves(child, f"{qual}.{child_name}" if qual else child_name)
        else:
            yield qual, module

    chain = list(leaves(path[depth], prefix))
    index = next(i for i, (n, _) in enumerate(chain) if n == name)
    return chain, index


def _refuse(activation: str, culprit: str, module: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"Cannot map the units of `{activation}` to weights: `{culprit}` ({type(module).__name__}) {why}. "
        "Pass the feeding and consuming layers to `reinit_dead_units(layer_in, layer_out, mask)` yourself, "
        "or use `replace_activation` instead."
    )


def _is_unit_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(module, _ConvNd) and not isinstance(module, nn.modules.conv._ConvTransposeNd)
    )


def find_units_weights(model: nn.Module, activation_name: str) -> UnitWeights:
    """Find the layer that feeds ``activation_name`` its units and the layer that consumes them.

    The activation must sit in an ``nn.Sequential`` (nested Sequentials are read as one chain).
    Walking back from it, the nearest Linear/Conv is the feeding layer; walking forward, the next
    Linear/Conv is the consuming one. On the way the walk passes through modules that act on each
    unit separately (activations, Dropout, Identity, pooling) and collects BatchNorm layers, whose
    entries for the units are reset along with the weights.

    Args:
        model: the model (a LightningModule works: names are those of its ``named_modules()``).
        activation_name: qualified name of the activation module, e.g. ``"net.1"``.

    Returns:
        The :class:`UnitWeights` of the activation.

    Raises:
        KeyError: if ``model`` has no module called ``activation_name``.
        ValueError: if the units cannot be mapped to weights, naming the module in the way and why:
            the parent is not a Sequential, a module mixes units (LayerNorm, Flatten, attention, a
            custom block), a layer is a transposed conv, or nothing consumes the activation.
    """
    modules = dict(model.named_modules())
    if not activation_name or activation_name not in modules:
        raise KeyError(f"Expected `activation_name` to name a submodule of the model, got {activation_name!r}")
    activation = modules[activation_name]
    if _is_unit_layer(activation):
        raise ValueError(
            f"Expected `activation_name` to name an activation module, got `{activation_name}` "
            f"({type(activation).__name__}); pass the activation that follows it"
        )
    chain, index = _chain(model, activation_name)

    def walk(steps: Sequence[int], side: str) -> tuple[str, UnitLayer, list[tuple[str, _BatchNorm]]]:
        norms: list[tuple[str, _BatchNorm]] = []
        for i in steps:
            name, module = chain[i]
            if isinstance(module, nn.modules.conv._ConvTransposeNd):
                raise _refuse(activation_name, name, module, "is a transposed convolution (weight laid out [in, out])")
            if isinstance(module, (nn.Linear, _ConvNd)):
                return name, module, norms
            if isinstance(module, _BatchNorm):
                norms.append((name, module))
            elif not _is_unitwise(module):
                raise _refuse(
                    activation_name,
                    name,
                    module,
                    "mixes units or is opaque (only activations, Dropout, Identity, pooling and BatchNorm may sit "
                    "between the feeding and the consuming layer)",
                )
        raise ValueError(
            f"Cannot map the units of `{activation_name}` to weights: no Linear or Conv layer {side} it in its "
            f"nn.Sequential{' (it feeds the output or code outside the Sequential)' if side == 'after' else ''}. "
            "Pass the layers to `reinit_dead_units(layer_in, layer_out, mask)` yourself."
        )

    in_name, layer_in, norms_before = walk(range(index - 1, -1, -1), "before")
    out_name, layer_out, norms_after = walk(range(index + 1, len(chain)), "after")
    norms = list(reversed(norms_before)) + norms_after
    return UnitWeights(
        activation_name=activation_name,
        layer_in_name=in_name,
        layer_in=layer_in,
        layer_out_name=out_name,
        layer_out=layer_out,
        norm_names=tuple(n for n, _ in norms),
        norms=tuple(m for _, m in norms),
    )


def _check_unit_layer(layer: nn.Module, arg: str) -> None:
    if not _is_unit_layer(layer):
        raise TypeError(
            f"Expected `{arg}` to be an nn.Linear or nn.Conv1d/2d/3d, got {type(layer).__name__}; transposed "
            "convolutions and custom layers are not supported"
        )
    if isinstance(layer.weight, UninitializedParameter):
        raise ValueError(
            f"Expected `{arg}` to be materialised, but {type(layer).__name__} is lazy: run a forward pass first"
        )
    if parametrize.is_parametrized(layer, "weight"):
        raise ValueError(
            f"Expected `{arg}` to own its weight, but {type(layer).__name__}.weight is parametrized "
            "(weight_norm, spectral_norm, ...): the stored tensors are not the weight itself"
        )


def _units_of(layer: UnitLayer) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _inputs_of(layer: UnitLayer) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _outgoing_mask(layer_out: UnitLayer, units: Tensor) -> Tensor:
    """Bool mask over ``layer_out.weight``'s first two dims selecting the weights that read ``units``."""
    weight = layer_out.weight
    groups = 1 if isinstance(layer_out, nn.Linear) else layer_out.groups
    # weight is [out, in / groups, ...]; output row r reads the input channels of its group only.
    per_group = units.view(groups, -1)
    rows_per_group = weight.shape[0] // groups
    return per_group.repeat_interleave(rows_per_group, dim=0)


def _new_weights(weight: Tensor, n: int, init: str, generator: torch.Generator | None) -> Tensor:
    receptive = math.prod(weight.shape[2:])
    fan_in = weight.shape[1] * receptive
    fan_out = weight.shape[0] * receptive
    # He uniform for a rectifier (Var = 2 / fan_in); Glorot uniform (Var = 2 / (fan_in + fan_out)).
    bound = math.sqrt(6.0 / fan_in) if init == "kaiming" else math.sqrt(6.0 / (fan_in + fan_out))
    fresh = torch.empty((n, *weight.shape[1:]), dtype=torch.float32, device=weight.device)
    fresh.uniform_(-bound, bound, generator=generator)
    return fresh.to(weight.dtype)


def _state_targets(
    optimizer: torch.optim.Optimizer | None, edits: list[tuple[Tensor, Tensor]]
) -> list[tuple[Tensor, Tensor]]:
    """The optimizer state tensors to clear, each with its mask; validated before anything changes."""
    if optimizer is None:
        return []
    targets = []
    for param, mask in edits:
        state = optimizer.state.get(param, {})
        for key, value in state.items():
            if not isinstance(value, Tensor) or value.dim() == 0:
                continue  # `step` and other per-tensor scalars: shared by every element, left alone
            if value.shape != param.shape:
                raise ValueError(
                    f"Cannot reset the optimizer state of the units: {type(optimizer).__name__} keeps "
                    f"`{key}` with shape {tuple(value.shape)} for a parameter of shape {tuple(param.shape)} "
                    "(factored or sharded state). Call `reinit_dead_units` with `optimizer=None` and reset it yourself."
                )
            targets.append((value, mask))
    return targets


@torch.no_grad()
def reinit_dead_units(
    layer_in: UnitLayer,
    layer_out: UnitLayer,
    dead_mask: Tensor,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    norms: Sequence[_BatchNorm] = (),
    init: InitName = "kaiming",
    generator: torch.Generator | None = None,
) -> int:
    """Recycle the masked units (ReDo): fresh incoming weights, zero outgoing weights, cleared state.

    For every unit ``i`` with ``dead_mask[i]``:

    * ``layer_in``: row ``i`` of the weight (Linear) or out-channel ``i`` (Conv) is drawn afresh
      (``init``) and its bias entry set to 0, so the unit's pre-activation is centred on 0 and it
      fires for about half of the inputs again;
    * ``layer_out``: column ``i`` of the weight (Linear) or in-channel ``i`` (Conv, grouped and
      depthwise included) is set to 0, so the unit's new output reaches nothing yet and the network
      computes the same function as before the reset: exactly so for dead units (they output 0),
      up to their small removed contribution for dormant ones. Gradient descent then grows the
      outgoing weights from 0;
    * ``norms`` (BatchNorm between the two layers): the unit's running mean/var go back to 0/1 and
      its affine weight/bias to 1/0;
    * ``optimizer``: every per-element state tensor of those weights (Adam/AdamW ``exp_avg``,
      ``exp_avg_sq``, ``max_exp_avg_sq``; SGD ``momentum_buffer``; RMSprop ``square_avg``, ...) is
      zeroed at exactly those rows/columns, as it is for a parameter the optimizer has not seen.
      Scalar state shared by the whole tensor, such as Adam's ``step``, cannot be reset per row
      and is left as it is (as the reference implementation leaves optax's shared count): the
      recycled rows then miss Adam's bias correction: under a steady gradient their updates are
      ``(1 - beta1**k) / sqrt(1 - beta2**k)`` times the learning rate ``k`` steps after the reset
      (3.2x at k=1, at most about 6.6x near k=13 with the default betas), falling back towards 1x
      as the second moment refills. Any stored ``.grad`` of those entries is zeroed too.

    Everything else (other rows and columns, their optimizer state, other parameters) is left
    bit-identical. Call it between optimizer steps (e.g. in ``on_train_batch_end``); under DDP,
    call it on every rank with the same mask and an identically seeded ``generator``.

    Args:
        layer_in: the nn.Linear / nn.Conv1d/2d/3d whose outputs are the units.
        layer_out: the nn.Linear / nn.Conv1d/2d/3d that reads the units as its inputs.
        dead_mask: bool vector with one entry per unit (``True`` = recycle).
        optimizer: the optimizer training these layers, or ``None`` to leave optimizer state alone.
        norms: BatchNorm layers over the same units between ``layer_in`` and ``layer_out``.
        init: ``"kaiming"`` (He uniform, for ReLU-family activations) or ``"xavier"`` (Glorot
            uniform, for tanh/sigmoid).
        generator: random generator on the weights' device, for reproducible (and DDP-identical)
            new weights.

    Returns:
        The number of units recycled.

    Raises:
        TypeError: if a layer is not a Linear/Conv (or a norm not a BatchNorm) or the mask is not bool.
        ValueError: if the shapes do not line up (mask vs ``layer_in``'s units vs ``layer_out``'s
            inputs vs the norms' features), ``init`` is unknown, a layer is lazy or parametrized,
            or the optimizer keeps state that cannot be indexed by row (nothing is changed then).
    """
    _check_unit_layer(layer_in, "layer_in")
    _check_unit_layer(layer_out, "layer_out")
    if init not in _INITS:
        raise ValueError(f"Expected `init` to be one of {_INITS}, got {init!r}")
    if not isinstance(dead_mask, Tensor) or dead_mask.dtype != torch.bool:
        raise TypeError(
            f"Expected `dead_mask` to be a bool tensor, got {type(dead_mask).__name__} "
            f"{getattr(dead_mask, 'dtype', '')}".rstrip()
        )
    units = _units_of(layer_in)
    if dead_mask.shape != (units,):
        raise ValueError(
            f"Expected `dead_mask` to have shape ({units},), one entry per output unit of `layer_in` "
            f"({type(layer_in).__name__}), got {tuple(dead_mask.shape)}"
        )
    if _inputs_of(layer_out) != units:
        raise ValueError(
            f"Expected `layer_out` to read the {units} units of `layer_in` as its inputs, but "
            f"{type(layer_out).__name__} takes {_inputs_of(layer_out)} (a Flatten or reshape in between cannot be "
            "mapped to units)"
        )
    for i, norm in enumerate(norms):
        if not isinstance(norm, _BatchNorm):
            raise TypeError(f"Expected `norms[{i}]` to be a BatchNorm layer, got {type(norm).__name__}")
        if norm.num_features != units:
            raise ValueError(f"Expected `norms[{i}]` to have {units} features like `layer_in`, got {norm.num_features}")

    mask = dead_mask.to(layer_in.weight.device)
    # Read the count once on the host before any edit; the edits themselves stay on the device.
    count = int(mask.sum().item())
    if count == 0:
        return 0

    out_mask = _outgoing_mask(layer_out, mask.to(layer_out.weight.device))
    edits: list[tuple[Tensor, Tensor]] = [(layer_in.weight, mask), (layer_out.weight, out_mask)]
    if layer_in.bias is not None:
        edits.append((layer_in.bias, mask))
    for norm in norms:
        for p in (norm.weight, norm.bias):
            if p is not None:
                edits.append((p, mask.to(p.device)))
    targets = _state_targets(optimizer, edits)  # raises before anything is modified

    layer_in.weight[mask] = _new_weights(layer_in.weight, count, init, generator)
    if layer_in.bias is not None:
        layer_in.bias[mask] = 0
    layer_out.weight[out_mask] = 0
    for norm in norms:
        entries: tuple[tuple[Tensor | None, float], ...] = (
            (norm.running_mean, 0.0),
            (norm.running_var, 1.0),
            (norm.weight, 1.0),
            (norm.bias, 0.0),
        )
        for tensor, fill in entries:
            if tensor is not None:
                tensor[mask.to(tensor.device)] = fill
    for param, pmask in edits:
        if param.grad is not None:
            param.grad[pmask] = 0
    for state, smask in targets:
        state[smask.to(state.device)] = 0
    return count


def replace_activation(
    model: nn.Module,
    old_type: type[nn.Module] | tuple[type[nn.Module], ...],
    new_factory: Callable[[], nn.Module],
    *,
    names: Iterable[str] | None = None,
) -> list[str]:
    """Swap activation modules in place, e.g. every ReLU for a LeakyReLU.

    Works at any depth and inside ``nn.Sequential``, ``nn.ModuleList`` and ``nn.ModuleDict``. A
    module registered under several names is replaced at each of them (by separate new modules).
    The new modules take the old one's train/eval mode and the device of the model's parameters.
    A new module with parameters (e.g. ``nn.PReLU``) is not known to an existing optimizer: add
    its parameters yourself.

    Args:
        model: the model to edit.
        old_type: the activation class(es) to replace (``isinstance`` match, so subclasses too).
        new_factory: called with no arguments once per replaced module; returns the new module,
            e.g. ``nn.GELU`` or ``lambda: nn.LeakyReLU(0.01)``.
        names: only replace the modules with these qualified names (each must exist and be an
            ``old_type``); ``None`` replaces every match.

    Returns:
        The qualified names that were replaced, in ``named_modules()`` order.

    Raises:
        ValueError: if a name in ``names`` is not a submodule or not an ``old_type``, or the model
            itself is an ``old_type`` (it has no parent to be replaced in).
        TypeError: if ``new_factory`` returns something that is not an nn.Module.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.ModuleList([nn.ReLU()]))
        >>> replace_activation(net, nn.ReLU, nn.GELU)
        ['1', '2.0']
        >>> net[1]
        GELU(approximate='none')
    """
    found = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, old_type)]
    if names is not None:
        wanted = list(dict.fromkeys(names))
        all_names = {n for n, _ in model.named_modules(remove_duplicate=False)}
        missing = [n for n in wanted if n not in all_names]
        if missing:
            raise ValueError(f"Expected `names` to name submodules of the model, but {missing} are not")
        matching = {n for n, _ in found}
        wrong = [n for n in wanted if n not in matching]
        if wrong:
            raise ValueError(f"Expected `names` to name modules of type {old_type}, but {wrong} are not")
        keep = set(wanted)
        found = [(n, m) for n, m in found if n in keep]
    if any(n == "" for n, _ in found):
        raise ValueError(f"Cannot replace the model itself ({type(model).__name__}): it has no parent module")
    reference = next(iter(model.parameters()), None)
    replaced = []
    for name, old in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        new = new_factory()
        if not isinstance(new, nn.Module):
            raise TypeError(f"Expected `new_factory` to return an nn.Module, got {type(new).__name__}")
        new.train(old.training)
        if reference is not None:
            new.to(device=reference.device)
        setattr(parent, attr, new)
        replaced.append(name)
    return replaced
