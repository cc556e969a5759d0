"""The diagnosis panel: one layer-per-line chart and a layer x step heatmap of one reading.

Rendering only: the panel is drawn from curves (``{layer: [(step, value), ...]}``, the shape of
``HealthMonitor.curves(metric)`` and of one metric of :class:`~lightning_health.offline.event_reader.RunHealth`),
never from tensors. It uses matplotlib's object API with the Agg canvas, so it needs no display,
leaves pyplot's global state alone and is safe to call from a training process.

Example:
    >>> curves = {"net.1": [(0, 0.0), (10, 0.5), (20, 1.0)], "net.3": [(0, 0.0), (10, 0.0), (20, 0.1)]}
    >>> png = panel_png(curves, title="sick")
    >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
    >>> panel_rgb(curves).shape[2]
    3
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from lightning_health._optional import installed

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lightning_health.offline.event_reader import RunHealth

LayerCurves = Mapping[str, Sequence[tuple[int, float]]]

#: Readings tried in order for a run's panel: the dead fraction needs a full window, so a run too
#: short to have one still gets a picture from the per-batch zero fraction.
PANEL_METRICS: tuple[tuple[str, str], ...] = (
    ("dead_fraction", "dead fraction"),
    ("val_dead_fraction", "validation dead fraction"),
    ("zero_fraction", "zero fraction (no dead fraction logged yet)"),
)


def heatmap_matrix(curves: LayerCurves) -> tuple[list[str], list[int], np.ndarray]:
    """Arrange curves as a ``layers x steps`` matrix, NaN where a layer has no reading at a step.

    Args:
        curves: ``{layer: [(step, value), ...]}``.

    Returns:
        ``(layers, steps, matrix)`` with layers in the given order and steps ascending.
    """
    layers = list(curves)
    steps = sorted({step for points in curves.values() for step, _ in points})
    column = {step: index for index, step in enumerate(steps)}
    matrix = np.full((len(layers), len(steps)), np.nan, dtype=np.float64)
    for row, layer in enumerate(layers):
        for step, value in curves[layer]:
            matrix[row, column[step]] = value
    return layers, steps, matrix


def panel_figure(
    curves: LayerCurves,
    *,
    title: str = "",
    value_label: str = "dead fraction",
    vmax: float | None = 1.0,
) -> Figure:
    """Draw the panel: one line per layer over the run (left) and the layer x step heatmap (right).

    Args:
        curves: ``{layer: [(step, value), ...]}`` for one reading.
        title: The figure title (the run's name).
        value_label: What the values are, for the axis and colour bar.
        vmax: The top of the colour scale and the y axis; ``None`` scales to the data (for readings
            that are not fractions).

    Returns:
        A matplotlib ``Figure`` attached to an Agg canvas.

    Raises:
        ModuleNotFoundError: If matplotlib is not installed.
    """
    if not installed("matplotlib"):
        raise ModuleNotFoundError(
            "Drawing the panel needs `matplotlib`; install it with `pip install 'lightning_health[plot]'`"
        )
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers, steps, matrix = heatmap_matrix(curves)
    height = max(3.6, 0.6 + 0.28 * len(layers))
    figure = Figure(figsize=(12.0, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    line_axes, heat_axes = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.0, 1.15]})

    colours = _layer_colours(len(layers))
    for layer, colour in zip(layers, colours, strict=True):
        points = curves[layer]
        xs = [step for step, _ in points]
        ys = [value if math.isfinite(value) else np.nan for _, value in points]
        line_axes.plot(xs, ys, color=colour, linewidth=2.0, marker="o" if len(xs) < 30 else None, markersize=3)
    line_axes.set_xlabel("step")
    line_axes.set_ylabel(value_label)
    line_axes.set_title(f"{value_label} per layer")
    if vmax is not None:
        line_axes.set_ylim(-0.03 * vmax, 1.03 * vmax)
    line_axes.grid(True, alpha=0.3)
    if layers:
        line_axes.legend(layers, fontsize="small", loc="best", ncol=1 if len(layers) <= 12 else 2)

    if matrix.size:
        image = heat_axes.imshow(
            np.ma.masked_invalid(matrix),
            aspect="auto",
            interpolation="nearest",
            cmap="magma",
            vmin=0.0,
            vmax=vmax,
        )
        figure.colorbar(image, ax=heat_axes, label=value_label)
        heat_axes.set_yticks(range(len(layers)), labels=layers, fontsize="small")
        tick_positions = np.unique(np.linspace(0, len(steps) - 1, num=min(len(steps), 8)).round().astype(int))
        heat_axes.set_xticks(tick_positions, labels=[str(steps[i]) for i in tick_positions])
    else:
        heat_axes.text(0.5, 0.5, "no readings", ha="center", va="center", transform=heat_axes.transAxes)
    heat_axes.set_xlabel("step")
    heat_axes.set_title(f"{value_label}: layer x step")
    if title:
        figure.suptitle(title)
    return figure


def panel_png(curves: LayerCurves, **kwargs: object) -> bytes:
    """The panel (see :func:`panel_figure`, same keyword arguments) as PNG bytes."""
    figure = panel_figure(curves, **kwargs)  # type: ignore[arg-type]
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def panel_rgb(curves: LayerCurves, **kwargs: object) -> np.ndarray:
    """The panel (see :func:`panel_figure`, same keyword arguments) as an ``(H, W, 3)`` uint8 array.

    This is what ``SummaryWriter.add_image(..., dataformats="HWC")`` and ``wandb.Image`` take.
    """
    figure = panel_figure(curves, **kwargs)  # type: ignore[arg-type]
    canvas = figure.canvas
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())  # type: ignore[attr-defined]
    return np.ascontiguousarray(rgba[..., :3])


def run_panel_curves(run: RunHealth) -> tuple[LayerCurves, str] | None:
    """The reading a run's panel shows (see :data:`PANEL_METRICS`) and its label, or ``None``."""
    for metric, label in PANEL_METRICS:
        curves = run.curves.get(metric)
        if curves and any(curves.values()):
            return curves, label
    return None


def save_run_panel(run: RunHealth, path: str | os.PathLike[str]) -> bool:
    """Write a run's panel to ``path`` as PNG.

    Returns:
        ``False`` (and writes nothing) when the run has none of the panel's readings.
    """
    chosen = run_panel_curves(run)
    if chosen is None:
        return False
    curves, label = chosen
    with open(path, "wb") as file:
        file.write(panel_png(curves, title=run.name, value_label=label))
    return True


def _layer_colours(count: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    if count <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(count)]
    if count <= 20:
        cmap = colormaps["tab20"]
        return [cmap(i) for i in range(count)]
    cmap = colormaps["turbo"]
    return [cmap(i / max(count - 1, 1)) for i in range(count)]
