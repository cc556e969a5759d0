"""The transformer readings' share of a sampled step: onto the one collective, then into history and diagnosis.

The packed readings (:meth:`~lightning_health.capture.transformer.TransformerCapture.pack`) ride the
step's single collective (the entropy sums and row counts summed across ranks, the maxima after the
step's ``shared_max`` timings) and reach the host in its single transfer. :func:`publish` turns the
host numbers into logged scalars, per-head histograms and the diagnosis snapshot, with each layer's
earlier levels (from the history) that the growth and drop rules compare against.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_health.capture.transformer import TransformerCapture
from lightning_health.pipeline.history import History
from lightning_health.sinks import Histogram

MASSIVE_RECENT = 10
"""Readings the massive-activation growth is measured over: outliers that build up over a long healthy
run (Sun et al. find them in every trained LLM) are not a finding; a jump within these few is."""

# earlier level kept in the snapshot per reading: (metric, snapshot key, fold, how many latest readings; None: all)
_EARLIER = (
    ("attn_logit_max", "attn_logit_max_low", min, None),
    ("massive_ratio", "massive_ratio_low", min, MASSIVE_RECENT),
)


def share(
    timing: Tensor | None, capture: TransformerCapture | None, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    """``(summed, maxed)``: the transformer readings to sum across ranks, and ``timing`` followed by
    those to reduce with max. The host numbers come back as ``[summed, timing, maxed]``."""
    if capture is None or not capture:
        return None, timing
    summed, maxed = capture.pack(device)
    return summed, maxed if timing is None else torch.cat([timing.to(device, torch.float64), maxed])


def _head_histogram(values: list[float], high: float) -> Histogram:
    bins = 16
    edges = tuple(high * i / bins for i in range(bins + 1))
    counts = [0.0] * (bins + 3)
    for v in values:
        if not math.isfinite(v):
            counts[-1] += 1
        elif v < 0:
            counts[0] += 1
        elif v > high:
            counts[-2] += 1
        else:
            counts[1 + min(bins - 1, int(v / high * bins))] += 1
    return Histogram(edges, tuple(counts))


def earlier_levels(history: History, layer: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """The earlier levels the growth rules compare ``metrics`` (this step's, not yet in ``history``) with."""
    out = {}
    for metric, key, fold, last in _EARLIER:
        earlier = [v for _s, v in history.curves(metric).get(layer, [])[-(last or 0) :] if math.isfinite(v)]
        if earlier and metric in metrics:
            out[key] = fold(earlier)
    return out


def publish(
    capture: TransformerCapture,
    host: list[float],
    step: int,
    history: History,
    scalars: dict[str, float],
    histograms: dict[str, Histogram],
    snapshot: dict[str, dict[str, float]],
) -> None:
    """Log the readings, record them in ``history`` and add them (with earlier levels) to ``snapshot``."""
    readings = capture.unpack(host)
    for layer, metrics in readings.metrics.items():
        entry = snapshot.setdefault(layer, {})
        entry.update(earlier_levels(history, layer, metrics))
        for metric, value in metrics.items():
            scalars[f"health/{metric}/{layer}"] = value
            history.add(step, metric, layer, value)
            entry[metric] = value
        if layer in readings.max_keys:
            entry["attn_max_entropy"] = math.log(max(1, readings.max_keys[layer]))
    for layer, heads in readings.head_entropy.items():
        high = max(math.log(max(2, readings.max_keys.get(layer, 2))), 1e-6)
        histograms[f"health/attn_head_entropy/{layer}"] = _head_histogram(heads, high)
