"""The gradient-flow picture: each monitored layer's gradient norm and activation RMS across depth.

Layers in forward order on the x axis, one line per chosen sampled step (a few, evenly spread from
the first to the latest, so the picture shows how the profile moved), log-scaled y. A healthy
network's lines are roughly flat; a vanishing gradient falls towards the input (left), an exploding
one rises. Drawn from curves (``{metric: {layer: [(step, value), ...]}}``, as ``HealthMonitor.curves``
and :class:`~lightning_health.offline.event_reader.RunHealth` give them) with matplotlib's object
API on the Agg canvas: no display, no pyplot state.

Example:
    >>> curves = {"grad_norm": {"a": [(0, 1e-4), (5, 1e-3)], "b": [(0, 1e-1), (5, 1e-1)]},
    ...           "act_rms": {"a": [(0, 1.0), (5, 1.0)], "b": [(0, 2.0), (5, 2.0)]}}
    >>> depth_profile_rgb(curves, ["a", "b"]).shape[2]
    3
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Curves = Mapping[str, Mapping[str, Sequence[tuple[int, float]]]]
PROFILE_TAG = "health/depth_profile"
PANELS = (("grad_norm", "activation gradient norm"), ("act_rms", "activation RMS"))


def profile_steps(curves: Curves, layers: Sequence[str], lines: int = 5) -> list[int]:
    """Up to ``lines`` sampled steps with a gradient reading, evenly spread, always the first and the latest."""
    per_layer = curves.get("grad_norm", {})
    steps = sorted({int(s) for name in layers for s, v in per_layer.get(name, ()) if math.isfinite(v)})
    if len(steps) <= lines:
        return steps
    picks = {steps[round(i * (len(steps) - 1) / (lines - 1))] for i in range(lines)}
    return sorted(picks)


def profile_layers(curves: Curves, layers: Sequence[str]) -> list[str]:
    """``layers`` (forward order) that have a gradient-norm or activation-RMS reading."""
    return [name for name in layers if any(name in curves.get(metric, {}) for metric, _label in PANELS)]


def draw_profile(axis: Any, curves: Curves, names: Sequence[str], steps: Sequence[int], metric: str) -> None:
    """On ``axis``: ``metric`` of each layer in ``names`` (x, in that order), one line per step, log y."""
    per_layer = curves.get(metric, {})
    for step in steps:
        ys = []
        for name in names:
            value = dict(per_layer.get(name, ())).get(step, math.nan)
            ys.append(value if math.isfinite(value) and value > 0 else math.nan)
        if any(math.isfinite(y) for y in ys):
            axis.plot(range(len(names)), ys, marker="o", label=f"step {step}")
    if axis.has_data():
        axis.set_yscale("log")
    axis.grid(True, alpha=0.3)


def profile_figure(curves: Curves, layers: Sequence[str], *, title: str = "gradient flow", lines: int = 5) -> object:
    """The two-panel matplotlib ``Figure`` (gradient norm, activation RMS per layer)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = profile_layers(curves, layers)
    steps = profile_steps(curves, names, lines)
    figure = Figure(figsize=(max(6.0, 0.5 * len(names) + 3), 5.5), dpi=90)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 1, sharex=True)
    for axis, (metric, label) in zip(axes, PANELS):
        draw_profile(axis, curves, names, steps, metric)
        axis.set_ylabel(label)
    axes[0].set_title(f"{title}: layers in forward order (input left)")
    if axes[0].has_data():
        axes[0].legend(fontsize="small", loc="best")
    axes[-1].set_xticks(range(len(names)))
    axes[-1].set_xticklabels(names, rotation=45, ha="right", fontsize="small")
    figure.tight_layout()
    return figure


def depth_profile_rgb(curves: Curves, layers: Sequence[str], **kwargs: object) -> np.ndarray:
    """:func:`profile_figure` as an ``(H, W, 3)`` uint8 array, what the sinks' ``image()`` takes."""
    figure = profile_figure(curves, layers, **kwargs)  # type: ignore[arg-type]
    canvas = figure.canvas  # type: ignore[attr-defined]
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])


def save_depth_profile(curves: Curves, layers: Sequence[str], path: str | os.PathLike[str], title: str) -> bool:
    """Write the picture to ``path`` as PNG; ``False`` (nothing written) without gradient-norm readings."""
    if not profile_steps(curves, layers):
        return False
    figure = profile_figure(curves, layers, title=title)
    figure.savefig(os.fspath(path), format="png")  # type: ignore[attr-defined]
    return True


def profile_path(panel_path: str | os.PathLike[str]) -> str:
    """Where the depth profile goes next to a panel PNG: ``health.png`` -> ``health-depth.png``."""
    root, ext = os.path.splitext(os.fspath(panel_path))
    return f"{root}-depth{ext or '.png'}"
