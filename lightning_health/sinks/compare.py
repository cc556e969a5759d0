"""The comparison figure of ``lightning-health report --png``: every run's panel charts side by side.

Top row: the status line (``health/status`` and the worst-layer readings), one line per run, so a
healthy and a sick run differ in one look. Below, one row per run: its dead fraction per layer (a
colour per layer, named in the legend), its layer x step heatmap (NaN/Inf cells in blue) and, when
any run logged the activation-gradient norm (``grad_norm``), its gradient norm across depth: layers
on x in forward order (input left), one line per few sampled steps, log y (see
:mod:`lightning_health.sinks.depth_profile`). Object API on an Agg canvas, as
:mod:`lightning_health.sinks.panel`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from lightning_health._optional import installed

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from lightning_health.offline.event_reader import RunHealth

DEPTH_TITLE = "gradient norm across depth (input left)"
NAN_BLUE = "#1e90ff"  # the heatmap's NaN/Inf blue (30, 144, 255)
#: ``(key in the status series, chart title)`` of the top row.
STATUS_CHARTS = (
    ("status", "status (0 ok, 1 warning, 2 critical)"),
    ("worst/nonfinite_layers", "layers with NaN/Inf"),
    ("worst/dead_fraction", "worst dead fraction"),
    ("worst/grad_std_ratio", "gradient std ratio (smallest/largest)"),
)


def comparison_figure(runs: Sequence[RunHealth]) -> Figure:
    """Draw every run (see the module docstring).

    Raises:
        ModuleNotFoundError: If matplotlib is not installed.
    """

    if not installed("matplotlib"):
        raise ModuleNotFoundError("Drawing the report needs `matplotlib`; pip install 'lightning_health[plot]'")
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lightning_health.offline.run_summary import status_series

    depth = any(_profile(run)[1] for run in runs)
    figure = Figure(figsize=(24.0 if depth else 18.0, 3.4 * (1 + len(runs))), dpi=90, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(1 + len(runs), 12)  # status charts 3 columns each; a run's charts 6 (or 4) each
    run_colours = [colormaps["tab10"](i % 10) for i in range(len(runs))]
    series = [status_series(run) for run in runs]
    for column, (key, title) in enumerate(STATUS_CHARTS):
        axes = figure.add_subplot(grid[0, 3 * column : 3 * column + 3])
        for run, per_run, colour in zip(runs, series, run_colours):
            points = per_run.get(key, [])
            if points:
                axes.plot([s for s, _ in points], [v for _, v in points], color=colour, linewidth=2, label=run.name)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("step")
        axes.grid(True, alpha=0.3)
        if column == 0:
            axes.legend(fontsize="small", loc="best")
            axes.set_yticks([0, 1, 2], labels=["ok", "warning", "critical"])
            axes.set_ylim(-0.2, 2.2)
    width = 4 if depth else 6
    for row, run in enumerate(runs, start=1):
        _dead_fraction_lines(figure.add_subplot(grid[row, :width]), run)
        _heatmap(figure.add_subplot(grid[row, width : 2 * width]), run)
        if depth:
            _depth_lines(figure.add_subplot(grid[row, 2 * width :]), run)
    return figure


def _profile(run: RunHealth) -> tuple[list[str], list[int]]:
    """The run's layers with a gradient norm, in logged (forward) order, and the few steps drawn."""
    from lightning_health.sinks.depth_profile import profile_steps

    names = [layer for layer in run.layers if layer in run.curves.get("grad_norm", {})]
    return names, profile_steps(run.curves, names)


def _depth_lines(axis: Axes, run: RunHealth) -> None:
    """The run's activation-gradient norm per layer across depth, one line per few sampled steps."""
    from lightning_health.sinks.depth_profile import draw_profile

    names, steps = _profile(run)
    axis.set_title(f"{run.name}: {DEPTH_TITLE}", fontsize=10)
    if not steps:
        axis.text(0.5, 0.5, "no gradient-norm readings", ha="center", va="center", transform=axis.transAxes)
        return
    draw_profile(axis, run.curves, names, steps, "grad_norm")
    axis.set_ylabel("activation gradient norm")
    axis.set_xticks(range(len(names)), labels=names, rotation=45, ha="right", fontsize="x-small")
    if axis.has_data():
        axis.legend(fontsize="x-small", loc="best")


def _dead_fraction_lines(lines: Axes, run: RunHealth) -> None:
    """A line per layer over the run's whole step range; where the run went NaN/Inf, a blue band says so."""
    from lightning_health.offline.run_summary import first_nonfinite_step
    from lightning_health.sinks.panel import _layer_colours

    curves = run.curves.get("dead_fraction", {})
    layers = list(curves)
    for layer, colour in zip(layers, _layer_colours(len(layers))):
        points = curves[layer]
        ys = [v if math.isfinite(v) else np.nan for _, v in points]
        lines.plot([s for s, _ in points], ys, color=colour, linewidth=1.8, label=layer)
    broken, last = first_nonfinite_step(run), run.last_step
    if last is not None and last > 0:
        lines.set_xlim(0, last)  # a run whose curves stop early (NaN) still spans its steps
    if broken is not None and last is not None and broken < last:
        lines.axvspan(broken, last, color=NAN_BLUE, alpha=0.15, label=f"NaN/Inf from step {broken}")
    lines.set_ylim(-0.03, 1.03)
    lines.set_title(f"{run.name}: dead fraction per layer", fontsize=10)
    lines.set_xlabel("step")
    lines.grid(True, alpha=0.3)
    if layers:
        lines.legend(fontsize="x-small", loc="best", ncol=1 if len(layers) <= 10 else 2)


def _heatmap(heat: Axes, run: RunHealth) -> None:
    from lightning_health.sinks.heatmap import heatmap_cells
    from lightning_health.sinks.heatmap_figure import cell_colours, draw_cells

    curves = run.curves.get("dead_fraction", {})
    names, steps, values, broken = heatmap_cells(curves, list(curves), 120, run.curves.get("nonfinite", {}))
    if values.size:
        draw_cells(heat, cell_colours(values, broken))
        heat.set_yticks(range(len(names)), labels=names, fontsize="x-small")
        ticks = np.unique(np.linspace(0, values.shape[1] - 1, num=min(values.shape[1], 8)).round().astype(int))
        heat.set_xticks(ticks, labels=[str(steps[i]) for i in ticks])
    else:
        heat.text(0.5, 0.5, "no dead-fraction readings", ha="center", va="center", transform=heat.transAxes)
    heat.set_title(f"{run.name}: layer x step (black alive, yellow dead, blue NaN/Inf)", fontsize=10)
    heat.set_xlabel("step")


def save_comparison(runs: Sequence[RunHealth], path: str | os.PathLike[str]) -> None:
    """Write :func:`comparison_figure` to ``path`` as PNG."""
    comparison_figure(runs).savefig(os.fspath(path), format="png")
