"""Argument validation for ``HealthMonitor``: one small checker per kind of argument.

Every error names the argument, the value and what is allowed, on one line, at construction
time, so a bad setting never reaches a running fit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

ON_CRITICAL = ("warn", "stop", "raise")


def positive_int(name: str, value: object, minimum: int = 1) -> int:
    """An int >= ``minimum`` (bools refused: ``True`` is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected `{name}` to be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"Expected `{name}` to be an int >= {minimum}, got {value}")
    return value


def optional_positive_int(name: str, value: object, minimum: int = 1) -> int | None:
    return None if value is None else positive_int(name, value, minimum)


def even_int(name: str, value: object, minimum: int = 2) -> int:
    value = positive_int(name, value, minimum)
    if value % 2:
        raise ValueError(f"Expected `{name}` to be an even int, got {value}")
    return value


def boolean(name: str, value: object) -> bool:
    """A real bool: ``log_histograms="no"`` must not mean yes."""
    if not isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be True or False, got {value!r} ({type(value).__name__})")
    return value


def fraction(name: str, value: object, low: float, high: float, *, optional: bool = False, example: str = "") -> Any:
    """A number strictly inside ``(low, high)``; ``None`` too when ``optional``."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
        allowed = f"{'None or ' if optional else ''}a fraction in ({low:g}, {high:g}){example}"
        raise ValueError(f"Expected `{name}` to be {allowed}, got {value!r}")
    return float(value)


def choice(name: str, value: object, allowed: Sequence[object]) -> Any:
    if value not in allowed:
        raise ValueError(f"Expected `{name}` to be one of {tuple(allowed)}, got {value!r}")
    return value


def neuron_dim(value: object) -> int | dict[str, int] | None:
    """``None``, an int for every layer, or ``{layer name: int}``."""
    ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
    if isinstance(value, dict):
        ok = all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in value.items())
    if not ok:
        raise TypeError(f"Expected `neuron_dim` to be None, an int or a dict of layer name to int, got {value!r}")
    return value  # type: ignore[return-value]


def writer(value: object) -> object:
    """A ``SummaryWriter``-like object or a log directory."""
    if value is not None and not isinstance(value, (str, os.PathLike)) and not hasattr(value, "add_scalar"):
        raise TypeError(f"Expected `writer` to be a SummaryWriter or a log directory, got {value!r}")
    return value


def optional_name(name: str, value: object) -> str | None:
    """``None`` or a non-empty string (a monitor's name in checkpoints)."""
    if value is not None and (not isinstance(value, str) or not value):
        raise TypeError(f"Expected `{name}` to be None or a non-empty string, got {value!r}")
    return value


def as_config(monitor: Any) -> dict[str, Any]:
    """A monitor's settings as plain values (what goes into a W&B run's config)."""
    import dataclasses

    from lightning_health.monitor.resume import stable_layers_repr

    return {
        "name": monitor.name,
        "every_n_steps": monitor.every_n_steps,
        "layers_spec": stable_layers_repr(monitor.layers),
        "dead_window": monitor.dead_window,
        "histogram_bins": monitor.histogram_bins,
        "histogram_samples": monitor.histogram_samples,
        "log_histograms": monitor.log_histograms,
        "on_critical": monitor.on_critical,
        "saturation_margin": monitor.saturation_margin,
        "max_overhead": monitor.max_overhead,
        "burst_steps": monitor.burst_steps,
        "compile_reductions": monitor.compile_reductions,
        "thresholds": dataclasses.asdict(monitor.thresholds),
        "dashboard": monitor.dashboard,
        "heatmap_every_n_samples": monitor.heatmap_every_n_samples,
        "update_ratio_max_bytes": monitor.update_ratio_max_bytes,
        "update_ratio_sample": monitor.update_ratio_sample,
        "attention": monitor.attention if isinstance(monitor.attention, bool) else repr(monitor.attention),
        **dataclasses.asdict(monitor.rescue_settings),
    }
