"""The dead-fraction heatmap: one picture of the whole run, layers x sampled steps, as an RGB array.

Rows are layers in forward order, columns are sampled steps, colour is the reading (inferno:
black = 0, pale yellow = 1), light grey where a layer has no reading yet (the dead window is still
filling) and blue where the reading is NaN or the layer's values were NaN/Inf at that step, so a run
gone NaN never looks healthy. With matplotlib installed the picture is a figure at its natural
size (about 900 pixels wide): layer names, step numbers on the axis, a colour bar and a legend for
the NaN and missing cells (:mod:`lightning_health.sinks.heatmap_figure`, Agg canvas, no display).
Without it, a NumPy fallback draws the same cells with a built-in pixel font.

Example:
    >>> rgb = render_heatmap({"net.1": [(0, 0.0), (10, 0.5)], "net.3": [(10, 1.0)]})
    >>> rgb.dtype, rgb.ndim, rgb.shape[2]
    (dtype('uint8'), 3, 3)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from lightning_health._optional import installed

# Inferno colour map anchors (perceptually uniform, readable when printed in grey).
_ANCHORS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)
_MISSING = (200, 200, 200)
_BROKEN = (30, 144, 255)  # NaN/Inf: a blue that inferno never takes
_BACKGROUND = (255, 255, 255)
_INK = (40, 40, 40)

# 3x5 glyphs, five rows top to bottom, "1" = ink. Lower case is drawn as upper case; space is blank.
_GLYPHS = {
    "0": "111/101/101/101/111", "1": "010/110/010/010/111", "2": "111/001/111/100/111", "3": "111/001/111/001/111",
    "4": "101/101/111/001/001", "5": "111/100/111/001/111", "6": "111/100/111/101/111", "7": "111/001/001/010/010",
    "8": "111/101/111/101/111", "9": "111/101/111/001/111", "A": "010/101/111/101/101", "B": "110/101/110/101/110",
    "C": "011/100/100/100/011", "D": "110/101/101/101/110", "E": "111/100/110/100/111", "F": "111/100/110/100/100",
    "G": "011/100/101/101/011", "H": "101/101/111/101/101", "I": "111/010/010/010/111", "J": "001/001/001/101/010",
    "K": "101/101/110/101/101", "L": "100/100/100/100/111", "M": "101/111/111/101/101", "N": "110/101/101/101/101",
    "O": "010/101/101/101/010", "P": "110/101/110/100/100", "Q": "010/101/101/110/011", "R": "110/101/110/101/101",
    "S": "011/100/010/001/110", "T": "111/010/010/010/010", "U": "101/101/101/101/111", "V": "101/101/101/101/010",
    "W": "101/101/111/111/101", "X": "101/101/010/101/101", "Y": "101/101/010/010/010", "Z": "111/001/010/100/111",
    ".": "000/000/000/000/010", "_": "000/000/000/000/111", "-": "000/000/111/000/000", "/": "001/001/010/100/100",
    ":": "000/010/000/010/000", "(": "010/100/100/100/010", ")": "010/001/001/001/010", "%": "101/001/010/100/101",
    "[": "110/100/100/100/110", "]": "011/001/001/001/011", "=": "000/111/000/111/000", "?": "111/001/011/000/010",
}  # fmt: skip
_GLYPH_W, _GLYPH_H, _SCALE = 3, 5, 2


def _glyph(char: str) -> np.ndarray:
    if char == " ":
        return np.zeros((_GLYPH_H, _GLYPH_W), dtype=bool)
    rows = _GLYPHS.get(char.upper(), _GLYPHS["?"]).split("/")
    return np.array([[c == "1" for c in row] for row in rows], dtype=bool)


def text_width(text: str) -> int:
    """Pixel width of ``text`` drawn by :func:`draw_text`."""
    return len(text) * (_GLYPH_W + 1) * _SCALE


def draw_text(img: np.ndarray, x: int, y: int, text: str, colour: tuple[int, int, int] = _INK) -> None:
    """Draw ``text`` into ``img`` (HxWx3, modified in place) with its top-left corner at ``(x, y)``."""
    for i, char in enumerate(text):
        mask = np.kron(_glyph(char), np.ones((_SCALE, _SCALE), dtype=bool))
        x0 = x + i * (_GLYPH_W + 1) * _SCALE
        h = max(0, min(mask.shape[0], img.shape[0] - y))
        w = max(0, min(mask.shape[1], img.shape[1] - x0))
        if h and w and x0 >= 0 and y >= 0:
            img[y : y + h, x0 : x0 + w][mask[:h, :w]] = colour


def colourise(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to inferno RGB (uint8); NaN becomes grey."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0)
    rgb = np.stack([np.interp(v, _ANCHORS, _COLOURS[:, c]) for c in range(3)], axis=-1)
    out = np.rint(rgb).astype(np.uint8)
    out[np.isnan(values)] = _MISSING
    return out


def heatmap_cells(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    layers: Sequence[str] | None = None,
    max_columns: int = 120,
    nonfinite: Mapping[str, Sequence[tuple[int, float]]] | None = None,
) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
    """:func:`heatmap_grid` plus a ``broken`` mask: the cells whose reading was NaN/Inf or whose layer
    counted NaN/Inf values (``nonfinite``: the ``nonfinite`` curves, ``{layer: [(step, count)]}``).

    Layers that only have ``nonfinite`` readings get a row too (their dead fraction never came).
    """
    nonfinite = nonfinite or {}
    broken_points = {
        name: [s for s, v in pts if v != 0] for name, pts in nonfinite.items() if any(v != 0 for _, v in pts)
    }
    merged = dict(curves)
    for name in broken_points:
        merged.setdefault(name, [])
    order = list(layers or []) + [n for n in curves if n not in (layers or [])]
    names, steps_, grid = heatmap_grid(
        {n: list(merged[n]) + [(s, math.nan) for s in broken_points.get(n, [])] for n in merged}, order, max_columns
    )
    broken = np.zeros(grid.shape, dtype=bool)
    if not steps_:
        return names, steps_, grid, broken
    all_steps = sorted({int(s) for n in names for s, _ in merged[n]} | {s for v in broken_points.values() for s in v})
    per_column = max(1, math.ceil(len(all_steps) / max_columns))
    column_of = {step: i // per_column for i, step in enumerate(all_steps)}
    for row, name in enumerate(names):
        bad = [s for s, v in merged[name] if not math.isfinite(v)] + broken_points.get(name, [])
        for step in bad:
            broken[row, column_of[int(step)]] = True
    return names, steps_, grid, broken


def heatmap_grid(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    layers: Sequence[str] | None = None,
    max_columns: int = 120,
) -> tuple[list[str], list[int], np.ndarray]:
    """Curves as a ``layers x columns`` grid (NaN where there is no reading).

    When there are more sampled steps than ``max_columns``, consecutive steps share a column and
    the column shows the *largest* reading among them, so a layer that died is never averaged away.

    Returns:
        ``(layer names, first step of each column, grid)``.
    """
    names = [name for name in (layers or []) if name in curves] + [n for n in curves if n not in (layers or [])]
    steps = sorted({int(step) for name in names for step, _ in curves[name]})
    if not names or not steps:
        return names, [], np.full((len(names), 0), np.nan)
    per_column = max(1, math.ceil(len(steps) / max_columns))
    column_of = {step: i // per_column for i, step in enumerate(steps)}
    n_cols = column_of[steps[-1]] + 1
    grid = np.full((len(names), n_cols), np.nan)
    for row, name in enumerate(names):
        for step, value in curves[name]:
            col = column_of[int(step)]
            if math.isfinite(value):
                grid[row, col] = value if np.isnan(grid[row, col]) else max(grid[row, col], value)
    return names, steps[::per_column], grid


def render_heatmap(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    layers: Sequence[str] | None = None,
    *,
    title: str = "dead fraction - layers x sampled steps",
    max_columns: int = 120,
    nonfinite: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    use_matplotlib: bool | None = None,
) -> np.ndarray:
    """Render ``{layer: [(step, value in [0, 1]), ...]}`` as an ``H x W x 3`` uint8 image.

    Args:
        curves: readings per layer, e.g. ``monitor.curves("dead_fraction")``.
        layers: row order (forward order); layers missing from it follow in ``curves`` order.
        title: drawn at the top.
        max_columns: at most this many step columns (see :func:`heatmap_grid`).
        nonfinite: the ``nonfinite`` curves: cells where a layer counted NaN/Inf values are drawn blue.
        use_matplotlib: ``None`` (default) uses matplotlib when it is installed; ``False`` forces the
            NumPy fallback.
    """
    cells = heatmap_cells(curves, layers, max_columns, nonfinite)
    if use_matplotlib is None:
        use_matplotlib = installed("matplotlib")
    if use_matplotlib:
        from lightning_health.sinks.heatmap_figure import heatmap_figure_rgb

        return heatmap_figure_rgb(*cells, title=title)
    return _render_numpy(*cells, title=title)


def _render_numpy(
    names: list[str],
    col_steps: list[int],
    grid: np.ndarray,
    broken: np.ndarray,
    *,
    title: str,
    row_height: int = 14,
    max_label: int = 28,
) -> np.ndarray:
    """The fallback without matplotlib: cells, layer names and the step range in a pixel font."""
    n_rows, n_cols = grid.shape
    pad, line = 8, _GLYPH_H * _SCALE
    labels = [n if len(n) <= max_label else ".." + n[-(max_label - 2) :] for n in names]
    label_w = max((text_width(s) for s in labels), default=0) + pad
    cell_w = max(2, min(16, 640 // max(n_cols, 1)))
    grid_w, grid_h = max(n_cols, 1) * cell_w, max(n_rows, 1) * row_height
    ramp_w = 96
    footer = f"step {col_steps[0]}" if col_steps else "no readings yet"
    width = max(
        pad + label_w + grid_w + pad,
        3 * pad + text_width(title) + ramp_w + 2 * text_width("0") + text_width("NAN") + 3 * pad + 2 * line,
    )
    height = pad + line + pad + grid_h + pad + line + pad
    img = np.full((height, width, 3), _BACKGROUND, dtype=np.uint8)
    draw_text(img, pad, pad, title)
    top, left = pad + line + pad, pad + label_w
    if n_cols:
        cells = colourise(grid)
        cells[broken] = _BROKEN
        img[top : top + grid_h, left : left + grid_w] = np.repeat(np.repeat(cells, row_height, 0), cell_w, 1)
        for row in range(1, n_rows):  # thin separators between layers
            img[top + row * row_height - 1, left : left + grid_w] = _BACKGROUND
    for row, label in enumerate(labels):
        draw_text(img, pad, top + row * row_height + (row_height - line) // 2, label)
    bottom = top + grid_h + pad
    draw_text(img, left, bottom, footer)
    if len(col_steps) > 1:
        last = str(col_steps[-1])
        draw_text(img, max(left + grid_w - text_width(last), left + text_width(footer) + pad), bottom, last)
    # colour bar on the title line, right: 0 [ramp] 1
    x1 = width - pad - text_width("1")
    x0 = x1 - pad // 2 - ramp_w
    img[pad : pad + line, x0 : x0 + ramp_w] = colourise(np.linspace(0.0, 1.0, ramp_w))[None, :, :]
    draw_text(img, x0 - pad // 2 - text_width("0"), pad, "0")
    draw_text(img, x1, pad, "1")
    if broken.any():  # a legend swatch for NaN, left of the ramp
        nx = x0 - pad - text_width("0") - text_width("NAN") - line - pad
        img[pad : pad + line, nx : nx + line] = _BROKEN
        draw_text(img, nx + line + _SCALE, pad, "NAN")
    return img
