"""The TensorBoard custom-scalars layout: which charts the diagnosis panel shows, in which order.

TensorBoard colours lines by run, not by tag, so a chart that overlays every layer of a run draws
them all in one colour. The layout is therefore built around what a colour can tell apart:

1. **health: status**, first: ``health/status`` (0 ok, 1 warning, 2 critical) and the worst layer's
   key readings (``health/worst/*``). One line per run, so two runs, a healthy and a sick one,
   compare in one look; NaN counts as the worst value, so a run gone NaN is never drawn as healthy.
2. **health: dead fraction per layer** and **health: gradient std per layer**: one chart per layer
   (titled with its forward position and name), every run overlaid in it. The sick layer is the chart
   whose line climbs; its title names it.
3. **health: all layers per metric**: the per-metric charts with every layer of a run overlaid
   (hover for the layer), and the share of each histogram beyond its edges.

Example:
    >>> layout = panel_layout("", ["net.1", "net.3"])
    >>> list(layout)[0], list(layout["health: dead fraction per layer"])
    ('health: status', ['1. net.1', '2. net.3'])
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lightning_health.sinks.status import STATUS_TAG, WORST_PREFIX

STATUS_CATEGORY = "health: status"
STATUS_CHARTS = (
    ("status (0 ok, 1 warning, 2 critical)", STATUS_TAG),
    ("layers with NaN/Inf", WORST_PREFIX + "nonfinite_layers"),
    ("worst dead fraction", WORST_PREFIX + "dead_fraction"),
    ("worst saturation", WORST_PREFIX + "saturation"),
    ("gradient std ratio, smallest/largest layer", WORST_PREFIX + "grad_std_ratio"),
)
#: ``(category, metric)``: one chart per layer, runs overlaid.
PER_LAYER = (
    ("health: dead fraction per layer", "dead_fraction"),
    ("health: gradient std per layer", "grad_std"),
)
PER_METRIC_CATEGORY = "health: all layers per metric"
PER_METRIC = (
    ("dead fraction", "dead_fraction"),
    ("saturation", "saturation"),
    ("activation std", "act_std"),
    ("gradient std", "grad_std"),
    ("activations beyond the histogram edges (share)", "act_out_of_range"),
    ("gradients beyond the histogram edges (share)", "grad_out_of_range"),
    ("non-finite activations", "nonfinite"),
    ("validation dead fraction", "val_dead_fraction"),
    ("zero fraction", "zero_fraction"),
    ("activation mean", "act_mean"),
    ("activation gradient norm", "grad_norm"),
    ("parameter gradient norm", "param_grad_norm"),
)


def panel_layout(prefix: str = "", layers: Sequence[str] = ()) -> dict[str, dict[str, list[Any]]]:
    """The layout as ``{category: {chart title: ["Multiline", [tag regex]]}}`` (``SummaryWriter.add_custom_scalars``).

    Args:
        prefix: what the logger puts before every tag (``TensorBoardLogger(prefix="train")``: ``"train-"``).
        layers: the monitored layers in forward order (one chart each in the per-layer categories).
    """
    start = "^" + re.escape(prefix)
    layout: dict[str, dict[str, list[Any]]] = {
        STATUS_CATEGORY: {title: ["Multiline", [rf"{start}{re.escape(tag)}$"]] for title, tag in STATUS_CHARTS}
    }
    for category, metric in PER_LAYER:
        layout[category] = {
            f"{index}. {layer}": ["Multiline", [rf"{start}health/{metric}/{re.escape(layer)}$"]]
            for index, layer in enumerate(layers, start=1)
        }
    layout[PER_METRIC_CATEGORY] = {title: ["Multiline", [rf"{start}health/{metric}/"]] for title, metric in PER_METRIC}
    return {category: charts for category, charts in layout.items() if charts}
