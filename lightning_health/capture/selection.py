"""Which modules are monitored, and what each one's activation means.

The rule, in order:

1. ``layers=None`` (the default) selects every *activation module*: torch.nn's activation classes
   (ReLU, LeakyReLU, GELU, SiLU, Tanh, Sigmoid, ...) and the activation classes that third-party
   libraries define themselves (``GELUActivation`` in transformers, timm's ``GELU``, ...), which do
   not subclass torch.nn's and are recognised by class name; and the functional feed-forward
   activation of every ``nn.TransformerEncoderLayer``/``TransformerDecoderLayer`` (``F.relu`` by
   default), read as the input of the layer's ``dropout`` module (``<layer>.dropout``).
2. If there is none of these (the model calls ``F.relu`` and friends), the outputs of its
   Linear and Conv layers are monitored instead, except ``nn.MultiheadAttention``'s ``out_proj``
   (its weights are used by a functional call; the module itself never runs). They are read as
   plain linear outputs (:data:`~lightning_health.capture.profile.NEUTRAL`): the activation that
   follows them is unknown, and the last of them is usually the model's output head, so no
   ``dead`` or ``saturated`` rule applies to them.
3. Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their cells) are always selected
   too: their output sequence (the first element of the output tuple) is read.
4. ``layers`` may instead be a module type (or tuple of types), a regular expression matched
   against qualified names (``re.search``), a list of exact names, or a predicate
   ``(name, module) -> bool``.

What each activation can do (die, go inactive, saturate) is measured by probing it, never read
from its class name: see :mod:`lightning_health.capture.profile`. A selected module that never
reports in the first sampled steps is dropped (see :meth:`~lightning_health.capture.hooks.Capture.settle`).

Units (neurons) are indexed by the last dimension of (batch, ..., features) tensors and by the
channel dimension (1) of convolutional feature maps; a layer is treated as convolutional when the
nearest module before it that owns parameters is a Conv or a channel normalisation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from lightning_health.capture.profile import (
    NEUTRAL,
    ActivationProfile,
    function_profile,
    probe_module,
    recurrent_profile,
)

LayerSpec = None | type | tuple[type, ...] | str | Iterable[str | type] | Callable[[str, nn.Module], bool]

# torch.nn classes that live with the activations but are not elementwise activations.
_NOT_ACTIVATIONS = (nn.MultiheadAttention, nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d)

# Third-party activation classes, recognised by name (lower case).
_ACTIVATION_NAME = re.compile(
    r"(relu|gelu|silu|swish|mish|tanh|sigmoid|softplus|softsign|selu|celu|elu|hardswish|quickgelu|"
    r"activation$|^act$|^sin$|^snake)",
)
_CONV_LIKE = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
)


_RECURRENT = (nn.RNNBase, nn.RNNCellBase)
_FEED_FORWARD_BLOCKS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_PROFILE_CACHE: dict[tuple[object, ...], ActivationProfile] = {}


def _config_key(module: nn.Module) -> tuple[object, ...] | None:
    """A key for modules without tensors whose plain attributes say everything (most activations)."""
    if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None:
        return None
    plain = (bool, int, float, str, type(None))
    items = sorted((k, v) for k, v in vars(module).items() if k != "training" and isinstance(v, plain))
    return (type(module), tuple(items))


def activation_profile(module: nn.Module) -> ActivationProfile:
    """What ``module``'s output means, measured by probing it (:mod:`~lightning_health.capture.profile`).

    Recurrent layers are read as their output's nonlinearity (:func:`recurrent_profile`); anything
    that is not elementwise gets the neutral profile. Class names play no part.
    """
    if isinstance(module, _RECURRENT):
        return recurrent_profile(module)
    key = _config_key(module)
    if key is None:
        return probe_module(module)
    if key not in _PROFILE_CACHE:
        _PROFILE_CACHE[key] = probe_module(module)
    return _PROFILE_CACHE[key]


def is_activation_module(module: nn.Module) -> bool:
    """True for torch.nn activations and third-party classes that are named like activations."""
    if isinstance(module, _NOT_ACTIVATIONS):
        return False
    if type(module).__module__ == nn.modules.activation.__name__:
        return True
    if isinstance(module, (nn.Identity, nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    if any(True for _ in module.children()):
        return False  # a block, not an activation
    return bool(_ACTIVATION_NAME.search(type(module).__name__.lower()))


def _fallback(name: str, module: nn.Module, attention_outputs: set[str]) -> bool:
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and name not in attention_outputs


def _attention_outputs(named: list[tuple[str, nn.Module]]) -> set[str]:
    """``out_proj`` of every nn.MultiheadAttention: its weights are used by a functional call, it never runs."""
    return {f"{n}.out_proj" if n else "out_proj" for n, m in named if isinstance(m, nn.MultiheadAttention)}


def _feed_forward_readings(named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module, ActivationProfile]]:
    """The functional activation of nn.TransformerEncoderLayer/DecoderLayer, read as the input of its ``dropout``.

    Their feed-forward computes ``linear2(dropout(activation(linear1(x))))`` with ``activation`` a
    function (``F.relu`` by default), not a module: no hook can see its output, except as the input
    of ``dropout`` (a forward pre-hook), which is exactly that output, in the autograd graph.
    """
    out = []
    for name, module in named:
        act, dropout = getattr(module, "activation", None), getattr(module, "dropout", None)
        if not isinstance(module, _FEED_FORWARD_BLOCKS) or not callable(act) or isinstance(act, nn.Module):
            continue
        if isinstance(dropout, nn.Module):
            out.append((f"{name}.dropout", dropout, function_profile(act)))
    return out


def _matcher(layers: LayerSpec) -> Callable[[str, nn.Module], bool]:
    if isinstance(layers, type) or (isinstance(layers, tuple) and all(isinstance(t, type) for t in layers)):
        types = layers
        return lambda _name, m: isinstance(m, types)
    if isinstance(layers, str):
        pattern = re.compile(layers)
        return lambda name, _m: bool(pattern.search(name))
    if callable(layers):
        predicate = layers

        def guarded(name: str, module: nn.Module) -> bool:
            try:
                return bool(predicate(name, module))  # type: ignore[call-arg]
            except Exception as err:
                raise ValueError(
                    f"The `layers` predicate raised on module {name!r} ({type(module).__name__}): "
                    f"{type(err).__name__}: {err}"
                ) from err

        return guarded
    if isinstance(layers, Iterable):
        items = list(layers)
        odd = [item for item in items if not isinstance(item, (str, type))]
        if odd:
            raise TypeError(
                f"Expected `layers` to list module names or module types (e.g. ['encoder.act', nn.GELU]), "
                f"got {odd[0]!r} ({type(odd[0]).__name__}) among them"
            )
        names = {item for item in items if isinstance(item, str)}
        types = tuple(item for item in items if isinstance(item, type))
        return lambda name, m: name in names or isinstance(m, types)
    raise TypeError(
        "Expected `layers` to be None, a module type or tuple of types, a regex string, a list of module "
        f"names, or a callable (name, module) -> bool, got {layers!r}"
    )


def validate_layer_spec(layers: LayerSpec) -> None:
    """Raise early (in ``__init__``) when ``layers`` has an unusable type."""
    if layers is None:
        return
    if isinstance(layers, str):
        try:
            re.compile(layers)
        except re.error as err:
            raise ValueError(f"Expected `layers` to be a valid regular expression, got {layers!r}: {err}") from err
        return
    _matcher(layers)


def check_names_exist(argument: str, names: Iterable[str], model: nn.Module) -> None:
    """Raise one line naming ``argument`` when ``names`` holds module names ``model`` lacks (typos)."""
    import difflib

    known = [n for n, _ in model.named_modules() if n]
    unknown = sorted(set(names) - set(known))
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(f"`{argument}` names modules the model does not have: {', '.join(hints)}")


@dataclass(frozen=True)
class MonitoredLayer:
    """One module the monitor reads, with how to read it."""

    name: str
    module: nn.Module
    profile: ActivationProfile
    neuron_dim: int  # -1 for features, 1 for conv channels (applied to tensors with >= 3 dims)
    read_input: bool = False  # read the module's input (a forward pre-hook) instead of its output


def _default_selection(named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module, ActivationProfile, bool]]:
    chosen = [(n, m, activation_profile(m), False) for n, m in named if is_activation_module(m)]
    chosen += [(n, m, p, True) for n, m, p in _feed_forward_readings(named)]
    if not chosen:
        attention = _attention_outputs(named)
        chosen = [(n, m, NEUTRAL, False) for n, m in named if _fallback(n, m, attention)]
    chosen += [(n, m, activation_profile(m), False) for n, m in named if isinstance(m, _RECURRENT)]
    position = {n: i for i, (n, _m) in enumerate(named)}
    return sorted(chosen, key=lambda c: position[c[0]])


def select_layers(
    model: nn.Module,
    layers: LayerSpec = None,
    neuron_dim: int | dict[str, int] | None = None,
) -> list[MonitoredLayer]:
    """The modules of ``model`` to monitor, in registration order (see the module docstring)."""
    named = [(n, m) for n, m in model.named_modules() if n]
    if layers is None:
        chosen = _default_selection(named)
    else:
        match = _matcher(layers)
        chosen = [(n, m, activation_profile(m), False) for n, m in named if match(n, m)]
    conv_context = _conv_context(named)
    out = []
    for name, module, profile, read_input in chosen:
        if isinstance(neuron_dim, dict):
            dim = neuron_dim.get(name, 1 if conv_context[name] else -1)
        elif neuron_dim is not None:
            dim = neuron_dim
        else:
            dim = 1 if conv_context[name] else -1
        out.append(MonitoredLayer(name, module, profile, dim, read_input))
    return out


def _conv_context(named: list[tuple[str, nn.Module]]) -> dict[str, bool]:
    """For each module, whether it (if it owns parameters) or the nearest such module before it is conv-like."""
    context: dict[str, bool] = {}
    last_conv = False
    for name, module in named:
        if any(True for _ in module.parameters(recurse=False)):
            last_conv = isinstance(module, _CONV_LIKE)
        context[name] = last_conv
    return context
