"""The activation table of docs/readings.md, generated from the probe (``python -m lightning_health.capture.catalog``).

Every row is what :func:`~lightning_health.capture.selection.activation_profile` reads the class as.
timm is not a dependency: its classes are probed through the formula each one computes (the
``timm.layers.activations`` definitions), which is what the probe would measure on the class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from lightning_health.capture.profile import ActivationProfile, probe
from lightning_health.capture.selection import activation_profile

F = nn.functional
HEADER = (
    "| activation | output range | can die (hard-zero side) | can go inactive (smooth off side) "
    "| shoulders | saturated when |\n| --- | --- | --- | --- | --- | --- |"
)
START, END = "<!-- activation-table:start -->", "<!-- activation-table:end -->"


def _torch_nn() -> Iterator[tuple[str, nn.Module]]:
    yield from (
        (f"`nn.{type(m).__name__}`", m)
        for m in (
            nn.ReLU(),
            nn.ReLU6(),
            nn.LeakyReLU(),
            nn.PReLU(),
            nn.RReLU(),
            nn.ELU(),
            nn.CELU(),
            nn.SELU(),
            nn.GELU(),
        )
    )
    yield '`nn.GELU(approximate="tanh")`', nn.GELU(approximate="tanh")
    for m in (
        nn.SiLU(),
        nn.Mish(),
        nn.Softplus(),
        nn.Hardswish(),
        nn.Hardsigmoid(),
        nn.Hardtanh(),
        nn.Sigmoid(),
        nn.Tanh(),
        nn.LogSigmoid(),
        nn.Softsign(),
        nn.Tanhshrink(),
        nn.Softshrink(),
        nn.Hardshrink(),
    ):
        yield f"`nn.{type(m).__name__}`", m
    yield "`nn.Threshold(0.1, 20.0)`", nn.Threshold(0.1, 20.0)
    mixing: tuple[nn.Module, ...] = (nn.GLU(), nn.Softmax(dim=-1), nn.Softmin(dim=-1), nn.LogSoftmax(dim=-1))
    for mix in mixing:
        yield f"`nn.{type(mix).__name__}`", mix


_TRANSFORMERS = (
    "GELUActivation",
    "NewGELUActivation",
    "PytorchGELUTanh",
    "GELUTanh",
    "FastGELUActivation",
    "QuickGELUActivation",
    "AccurateGELUActivation",
    "MishActivation",
    "SiLUActivation",
    "LaplaceActivation",
    "ReLUSquaredActivation",
    "LinearActivation",
)


def _transformers() -> Iterator[tuple[str, nn.Module]]:
    try:
        from transformers import activations
    except Exception:  # not installed: no rows
        return
    for name in _TRANSFORMERS:
        cls = getattr(activations, name, None)
        if cls is not None:
            try:
                yield f"transformers `{name}`", cls()
            except Exception:
                continue
    if hasattr(activations, "ClippedGELUActivation"):
        yield "transformers `ClippedGELUActivation(-10, 10)`", activations.ClippedGELUActivation(-10.0, 10.0)


_TIMM: tuple[tuple[str, Callable[[Tensor], Tensor]], ...] = (
    ("`Swish`/`SiLU` (`x * sigmoid(x)`)", lambda x: x * torch.sigmoid(x)),
    ("`Mish` (`x * tanh(softplus(x))`)", lambda x: x * torch.tanh(F.softplus(x))),
    ("`HardSwish` (`x * relu6(x + 3) / 6`)", lambda x: x * F.relu6(x + 3) / 6),
    ("`HardSigmoid` (`relu6(x + 3) / 6`)", lambda x: F.relu6(x + 3) / 6),
    ("`HardMish` (`0.5 * x * clamp(x + 2, 0, 2)`)", lambda x: 0.5 * x * (x + 2).clamp(min=0, max=2)),
    ("`GELU` (`F.gelu`)", F.gelu),
    ("`GELUTanh` (`F.gelu(x, approximate='tanh')`)", lambda x: F.gelu(x, approximate="tanh")),
    ("`QuickGELU` (`x * sigmoid(1.702 x)`)", lambda x: x * torch.sigmoid(1.702 * x)),
)


def _num(v: float) -> str:
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v + 0.0:.4g}"


def row(label: str, p: ActivationProfile) -> str:
    """One markdown row of the table for a profile."""
    if not p.probed:
        return f"| {label} | not elementwise: neutral | no | no | none | never |"
    low, high = p.range
    shoulders = [side for side, v in zip(("low", "high"), p.shoulders) if v is not None]
    shoulder_text = ", ".join(f"{s} ({_num(v)})" for s, v in zip(shoulders, [v for v in p.shoulders if v is not None]))
    when = "never"
    if p.saturation is not None:
        parts = []
        if not math.isinf(p.saturation[0]):
            parts.append(f"y <= {_num(p.saturation[0])}")
        if not math.isinf(p.saturation[1]):
            parts.append(f"y >= {_num(p.saturation[1])}")
        when = " or ".join(parts)
    return (
        f"| {label} | ({_num(low)}, {_num(high)}) | {'yes' if p.can_die else 'no'} "
        f"| {'yes' if p.off_side == 'smooth' else 'no'} | {shoulder_text or 'none'} | {when} |"
    )


def rows() -> list[str]:
    """Every row: torch.nn, then transformers (when installed), then timm (by formula)."""
    out = [row(label, activation_profile(m)) for label, m in _torch_nn()]
    out += [row(label, activation_profile(m)) for label, m in _transformers()]
    out += [row(f"timm {label}", probe(fn)) for label, fn in _TIMM]
    return out


def activation_table() -> str:
    """The whole table, between its markers, as it appears in docs/readings.md."""
    return "\n".join([START, HEADER, *rows(), END])


if __name__ == "__main__":  # pragma: no cover
    print(activation_table())
