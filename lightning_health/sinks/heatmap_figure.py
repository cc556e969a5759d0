"""The heatmap drawn with matplotlib: readable at its natural size in TensorBoard's Images tab and in W&B.

Object API on an Agg canvas (no display, pyplot's global state untouched), so it is safe in a
training process. Cells come from :func:`lightning_health.sinks.heatmap.heatmap_cells`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lightning_health.sinks.heatmap import _BROKEN, _MISSING

_MAX_LABEL = 40


def _rgb01(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    return rgb[0] / 255.0, rgb[1] / 255.0, rgb[2] / 255.0


def _short(name: str) -> str:
    return name if len(name) <= _MAX_LABEL else "…" + name[-(_MAX_LABEL - 1) :]


def cell_colours(grid: np.ndarray, broken: np.ndarray) -> np.ndarray:
    """RGB floats of the cells: inferno for 0..1, light grey where there is no reading, blue for NaN/Inf."""
    from matplotlib import colormaps

    rgb = colormaps["inferno"](np.clip(np.nan_to_num(grid, nan=0.0), 0.0, 1.0))[..., :3]
    rgb[np.isnan(grid)] = np.array(_MISSING) / 255.0
    rgb[broken] = np.array(_BROKEN) / 255.0
    return rgb


def draw_cells(axes: Any, rgb: np.ndarray) -> None:
    """``rows x cols x 3`` cell colours on ``axes``, row 0 on top, cell ``(r, c)`` centred on ``(c, r)``
    as ``imshow`` would place it: one mesh of quads, drawn as vectors. ``imshow`` resamples the image
    into float arrays of the axes' pixel size, ~20 MiB held for a moment at a sampled step's end."""
    rows, cols = rgb.shape[:2]
    axes.pcolormesh(np.arange(cols + 1) - 0.5, np.arange(rows + 1) - 0.5, rgb, shading="flat")
    axes.set_xlim(-0.5, cols - 0.5)
    axes.set_ylim(rows - 0.5, -0.5)


def heatmap_figure_rgb(
    names: list[str], col_steps: list[int], grid: np.ndarray, broken: np.ndarray, *, title: str
) -> np.ndarray:
    """``H x W x 3`` uint8: layers (rows) x sampled steps, a colour bar for 0..1, a legend for NaN and missing."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n_rows, n_cols = grid.shape
    cmap = colormaps["inferno"]
    rgb = cell_colours(grid, broken) if grid.size else np.zeros((1, 1, 3))
    figure = Figure(figsize=(9.0, 1.6 + 0.32 * max(n_rows, 1)), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    draw_cells(axes, rgb)
    axes.set_yticks(range(n_rows), labels=[_short(n) for n in names], fontsize=9)
    if n_cols:
        ticks = np.unique(np.linspace(0, n_cols - 1, num=min(n_cols, 10)).round().astype(int))
        axes.set_xticks(ticks, labels=[str(col_steps[i]) for i in ticks], fontsize=9)
    axes.set_xlabel("step (first sampled step of each column)" if n_cols < len(col_steps) else "step")
    axes.set_title(title, fontsize=11)
    bar = figure.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap), ax=axes, fraction=0.04, pad=0.02)
    bar.set_label("dead fraction", fontsize=9)
    handles = [Patch(color=_rgb01(_MISSING), label="no reading yet")]
    if broken.any():
        handles.insert(0, Patch(color=_rgb01(_BROKEN), label="NaN/Inf"))
    figure.legend(handles=handles, loc="outside lower right", ncol=len(handles), fontsize=8, frameon=False)
    canvas = figure.canvas
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])  # type: ignore[attr-defined]
