"""Recycle dead and dormant units (ReDo): fresh incoming weights, zero outgoing weights, cleared state.

Recycling (Sokar et al., "The Dormant Neuron Phenomenon in Deep Reinforcement Learning", ICML
2023) gives a dead unit fresh *incoming* weights, so it fires again, and zeroes its *outgoing*
weights, so what the network computes does not change at the moment of the reset: the unit used to
contribute ``w_out * 0`` and now contributes ``0 * a``. The optimizer's per-element state (Adam's
moments, SGD's momentum, ...) of exactly those weights is cleared, so stale statistics of a frozen
unit do not steer its new weights; every other weight and state entry is left bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

from lightning_health.rescue.locate import InitName, UnitLayer, is_unit_layer

_INITS = ("kaiming", "xavier")


def _check_unit_layer(layer: nn.Module, arg: str) -> None:
    if not is_unit_layer(layer):
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


def _check_arguments(
    layer_in: nn.Module, layer_out: nn.Module, dead_mask: object, norms: Sequence[nn.Module], init: str
) -> None:
    """Every argument of :func:`reinit_dead_units` checked before anything changes."""
    _check_unit_layer(layer_in, "layer_in")
    _check_unit_layer(layer_out, "layer_out")
    if init not in _INITS:
        raise ValueError(f"Expected `init` to be one of {_INITS}, got {init!r}")
    if not isinstance(dead_mask, Tensor) or dead_mask.dtype != torch.bool:
        raise TypeError(
            f"Expected `dead_mask` to be a bool tensor, got {type(dead_mask).__name__} "
            f"{getattr(dead_mask, 'dtype', '')}".rstrip()
        )
    units = _units_of(layer_in)  # type: ignore[arg-type]
    if dead_mask.shape != (units,):
        raise ValueError(
            f"Expected `dead_mask` to have shape ({units},), one entry per output unit of `layer_in` "
            f"({type(layer_in).__name__}), got {tuple(dead_mask.shape)}"
        )
    inputs = _inputs_of(layer_out)  # type: ignore[arg-type]
    if inputs != units:
        raise ValueError(
            f"Expected `layer_out` to read the {units} units of `layer_in` as its inputs, but "
            f"{type(layer_out).__name__} takes {inputs} (a Flatten or reshape in between cannot be "
            "mapped to units)"
        )
    for i, norm in enumerate(norms):
        if not isinstance(norm, _BatchNorm):
            raise TypeError(f"Expected `norms[{i}]` to be a BatchNorm layer, got {type(norm).__name__}")
        if norm.num_features != units:
            raise ValueError(f"Expected `norms[{i}]` to have {units} features like `layer_in`, got {norm.num_features}")


def _apply(
    layer_in: UnitLayer,
    layer_out: UnitLayer,
    mask: Tensor,
    out_mask: Tensor,
    norms: Sequence[_BatchNorm],
    edits: list[tuple[Tensor, Tensor]],
    targets: list[tuple[Tensor, Tensor]],
    count: int,
    init: str,
    generator: torch.Generator | None,
) -> None:
    """The edits themselves, all on the device: new rows in, zero columns out, norms and state reset."""
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
    _check_arguments(layer_in, layer_out, dead_mask, norms, init)
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

    _apply(layer_in, layer_out, mask, out_mask, norms, edits, targets, count, init, generator)
    return count
