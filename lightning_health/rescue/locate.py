"""Where a unit's weights live: the layer feeding an activation and the layer reading it.

A unit is an output row (Linear) or out-channel (Conv) of the layer feeding the activation, and an
input column (Linear) or in-channel (Conv) of the layer consuming it. :func:`find_units_weights`
finds the two layers for an activation inside ``nn.Sequential`` chains; for other models, pass the
layers to :func:`~lightning_health.rescue.recycle.reinit_dead_units` yourself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

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


def is_unit_layer(module: nn.Module) -> bool:
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
    if is_unit_layer(activation):
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
