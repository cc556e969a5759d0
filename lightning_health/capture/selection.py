"""Which modules are monitored, and what each one's activation means.

The rule, in order:

1. ``layers=None`` (the default) selects every *activation module*: torch.nn's activation classes
   (ReLU, LeakyReLU, GELU, SiLU, Tanh, Sigmoid, ...) and the activation classes that third-party
   libraries define themselves (``GELUActivation`` in transformers, timm's ``GELU``, ...), which do
   not subclass torch.nn's and are recognised by class name.
2. If the model has no activation module (it calls ``F.relu`` and friends), the outputs of its
   Linear and Conv layers are monitored instead: they are the pre-activations of those calls.
3. ``layers`` may instead be a module type (or tuple of types), a regular expression matched
   against qualified names (``re.search``), a list of exact names, or a predicate
   ``(name, module) -> bool``.

Units (neurons) are indexed by the last dimension of (batch, ..., features) tensors and by the
channel dimension (1) of convolutional feature maps; a layer is treated as convolutional when the
nearest module before it that owns parameters is a Conv or a channel normalisation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

LayerSpec = None | type | tuple[type, ...] | str | Iterable[str] | Callable[[str, nn.Module], bool]

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


@dataclass(frozen=True)
class ActivationProfile:
    """What an activation's output means for the health readings.

    Attributes:
        rectifier: the activation has a flat zero side (ReLU, GELU, SiLU, ...): a unit that never
            outputs > 0 gets no gradient, so *dead* units are a pathology worth reporting.
        bounds: ``(low, high)`` when the activation has flat shoulders (tanh, sigmoid, hardtanh);
            outputs pressed against a bound are *saturated*. ``None``: nothing saturates.
    """

    rectifier: bool
    bounds: tuple[float, float] | None


_UNBOUNDED_RECTIFIER = ActivationProfile(rectifier=True, bounds=None)
_LEAKY = ActivationProfile(rectifier=False, bounds=None)


def activation_profile(module: nn.Module) -> ActivationProfile:
    """The profile of ``module``'s activation, from its type or, for third-party classes, its name."""
    if isinstance(module, nn.Hardtanh):  # includes ReLU6
        low, high = float(module.min_val), float(module.max_val)
        if isinstance(module, nn.ReLU6):
            return ActivationProfile(rectifier=True, bounds=(low, high))
        return ActivationProfile(rectifier=False, bounds=(low, high))
    if isinstance(module, (nn.Tanh, nn.Softsign)):
        return ActivationProfile(rectifier=False, bounds=(-1.0, 1.0))
    if isinstance(module, (nn.Sigmoid, nn.Hardsigmoid)):
        return ActivationProfile(rectifier=False, bounds=(0.0, 1.0))
    if isinstance(module, (nn.ReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Softplus)):
        return _UNBOUNDED_RECTIFIER
    if isinstance(module, (nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.Tanhshrink)):
        return _LEAKY
    name = type(module).__name__.lower()
    if "tanh" in name:
        return ActivationProfile(rectifier=False, bounds=(-1.0, 1.0))
    if "sigmoid" in name:
        return ActivationProfile(rectifier=False, bounds=(0.0, 1.0))
    if any(k in name for k in ("leaky", "prelu", "elu")) and not any(k in name for k in ("gelu", "relu")):
        return _LEAKY
    if "leaky" in name:
        return _LEAKY
    return _UNBOUNDED_RECTIFIER


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


def _fallback(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))


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
        names = set(layers)
        return lambda name, _m: name in names
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


def select_layers(
    model: nn.Module,
    layers: LayerSpec = None,
    neuron_dim: int | dict[str, int] | None = None,
) -> list[MonitoredLayer]:
    """The modules of ``model`` to monitor, in registration order (see the module docstring)."""
    named = [(n, m) for n, m in model.named_modules() if n]
    if layers is None:
        chosen = [(n, m) for n, m in named if is_activation_module(m)]
        if not chosen:
            chosen = [(n, m) for n, m in named if _fallback(m)]
    else:
        match = _matcher(layers)
        chosen = [(n, m) for n, m in named if match(n, m)]
    conv_context = _conv_context(named)
    out = []
    for name, module in chosen:
        if isinstance(neuron_dim, dict):
            dim = neuron_dim.get(name, 1 if conv_context[name] else -1)
        elif neuron_dim is not None:
            dim = neuron_dim
        else:
            dim = 1 if conv_context[name] else -1
        profile = _UNBOUNDED_RECTIFIER if _fallback(module) else activation_profile(module)
        out.append(MonitoredLayer(name=name, module=module, profile=profile, neuron_dim=dim))
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
