"""The step-end counts computed for all layers at once equal the per-layer functions they replace."""

from __future__ import annotations

import math

import torch

from lightning_health.pipeline.batched import CollapseCounts, DormantCounts, SegmentSums
from lightning_health.readings.collapse import collapsed_units, unit_moments
from lightning_health.readings.dormancy import dormant_mask


def test_segment_sums_are_the_sum_of_each_part():
    parts = [torch.tensor([True, False, True]), torch.tensor([False]), torch.ones(5, dtype=torch.bool)]
    sums = SegmentSums()
    assert sums(parts, torch.device("cpu")).tolist() == [2.0, 0.0, 5.0]
    assert sums(parts[:1], torch.device("cpu")).tolist() == [2.0]  # a new layout rebuilds the index
    assert sums([], torch.device("cpu")).numel() == 0


def test_dormant_counts_equal_dormant_mask_per_window():
    g = torch.Generator().manual_seed(0)
    windows = []
    for width in (4, 1, 7, 3):
        sums = torch.rand(5, width, generator=g, dtype=torch.float64) * torch.tensor([0.0, 0.01, 1.0, 3.0] * 2)[:width]
        windows.append((sums, torch.full((5,), 10.0, dtype=torch.float64)))
    windows[1][0][2, 0] = math.nan  # a unit that saw NaN: no evidence either way
    windows[3] = (torch.zeros(5, 3, dtype=torch.float64), windows[3][1])  # a silent layer: all dormant
    for tau in (0.0, 0.025, 0.5):
        expected = [dormant_mask(s.sum(0), c.sum(), tau).sum().item() for s, c in windows]
        assert DormantCounts()(windows, tau, torch.device("cpu")).tolist() == expected


def test_collapse_counts_equal_collapsed_units_summed_per_layer():
    g = torch.Generator().manual_seed(1)
    blocks, spans, expected, at = [], [], [], 0
    for layer_slots in ([(6, 32)], [(4, 16), (4, 1)], [(3, 8)]):
        layer_spans, total = [], torch.zeros(2, dtype=torch.float64)
        for width, n in layer_slots:
            x = torch.randn(n, width, generator=g)
            x[:, 0] = 2.5  # one constant unit
            m = unit_moments(x)
            blocks += [m, torch.tensor([float(n)], dtype=torch.float64)]
            layer_spans.append((at, width))
            at += 2 * width + 1
            total += collapsed_units(m, float(n), 1e-3)
        spans.append(layer_spans)
        expected.append(total.tolist())
    synced = torch.cat(blocks)
    assert CollapseCounts()(synced, spans, 1e-3).tolist() == expected
