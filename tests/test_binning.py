"""Histogram binning: the CPU lookup against NumPy's binary search, and the step's batched counts
against NumPy's histograms of the same samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_health.capture import histograms as H
from lightning_health.readings import reductions as R
from lightning_health.readings.binning import Binning

EDGE_SETS = {
    "symlog activations": R.symlog_edges(64, 1e-4, 1e4),
    "symlog gradients": R.symlog_edges(64, 1e-9, 1e3),
    "linear [0, 1]": R.linear_edges(64, 0.0, 1.0),
    "linear [-1, 1], 100 bins": R.linear_edges(100, -1.0, 1.0),
    "linear [0, 1], 2048 bins (too fine for the lookup)": R.linear_edges(2048, 0.0, 1.0),
    "uneven": torch.tensor([-3.0, -1e-30, 0.0, 1e-38, 2.5e-3, 7.0, 3e20]),
}


def _hard_values(boundaries: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Every kind of float32: random bit patterns (NaN payloads, subnormals, +-Inf, -0.0 included), the
    boundaries themselves and their neighbours on both sides, their negatives, and ordinary values."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=g, dtype=torch.int32).view(torch.float32)
    up = torch.nextafter(boundaries, torch.full_like(boundaries, np.inf))
    down = torch.nextafter(boundaries, torch.full_like(boundaries, -np.inf))
    specials = torch.tensor([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 3.4028235e38, -3.4028235e38])
    ordinary = torch.randn(20_000, generator=g) * torch.exp(torch.randn(20_000, generator=g) * 5)
    return torch.cat([bits, boundaries, up, down, -boundaries, -up, specials, ordinary])


@pytest.mark.parametrize("name", list(EDGE_SETS))
def test_lookup_slots_equal_numpy_searchsorted_on_every_kind_of_float(name):
    boundaries = R.bucket_boundaries(EDGE_SETS[name])
    values = _hard_values(boundaries)
    binning = Binning(boundaries)
    v = values.numpy().copy()
    v[~np.isfinite(v)] = np.inf  # NaN and -Inf count as non-finite: the last slot
    expected = np.searchsorted(boundaries.numpy(), v, side="right")
    got = binning.slots(values).numpy()
    assert np.array_equal(got, expected), f"{int((got != expected).sum())} values in the wrong slot"
    uses_lookup = binning._table is not None
    assert uses_lookup == ("too fine" not in name)


def _numpy_counts(sample: np.ndarray, edges: np.ndarray) -> list[float]:
    """The ``histogram_counts`` layout from NumPy: below, the bins, above, non-finite."""
    finite = sample[np.isfinite(sample)]
    inside, _ = np.histogram(finite, bins=edges)
    below, above, nonfinite = np.sum(finite < edges[0]), np.sum(finite > edges[-1]), np.sum(~np.isfinite(sample))
    return [float(below), *inside.astype(float), float(above), float(nonfinite)]


@pytest.mark.parametrize("limit", [H.PENDING_LIMIT, 3000])  # 3000: binned early, part by part
def test_step_histograms_equal_numpy_per_layer_summed_over_calls(monkeypatch, limit):
    monkeypatch.setattr(H, "PENDING_LIMIT", limit)
    act_edges = {"a": R.symlog_edges(16, 1e-3, 1e3), "b": R.linear_edges(10, 0.0, 1.0)}
    grad_edges = R.symlog_edges(16, 1e-6, 1e2)
    step = H.StepHistograms(act_edges, grad_edges, samples=1000)
    g = torch.Generator().manual_seed(3)
    calls = {
        (H.ACT, 0, "a"): [torch.randn(4000, generator=g) * 50, (torch.randn(30, 70, generator=g) * 1e4).bfloat16()],
        (H.ACT, 1, "b"): [torch.rand(2500, generator=g)],
        (H.GRAD, 0, None): [torch.randn(5000, generator=g) * 1e-4],
        (H.GRAD, 1, None): [torch.randn(999, generator=g), torch.full((10,), float("nan"))],
    }
    expected = {}
    for (kind, index, layer), tensors in calls.items():
        edges = (act_edges[layer] if layer else grad_edges).numpy()
        total = np.zeros(edges.size + 2)
        for t in tensors:
            sample = R.histogram_sample(t, 1000).numpy().copy()
            step.take(kind, index, layer, t)
            total += _numpy_counts(sample, edges)
            t.zero_() if t.dtype == torch.float32 else None  # the hook's tensor may change after: a copy was kept
        expected[(kind, index)] = total.tolist()
    got = {key: counts.tolist() for key, counts in step.counts().items()}
    assert got == expected
    assert step.counts() == {}  # released once read


def test_histograms_of_a_new_step_start_empty():
    step = H.StepHistograms(None, R.symlog_edges(8, 1e-3, 1e3), samples=64)
    step.take(H.GRAD, 0, None, torch.ones(10))
    step.clear()
    step.take(H.GRAD, 0, None, -torch.ones(5))
    (counts,) = step.counts().values()
    assert counts.sum().item() == 5


def test_a_step_of_other_shapes_is_binned_with_its_own_rows():
    """Sequence lengths change between steps: each step's layout gets its own row offsets."""
    edges = R.symlog_edges(8, 1e-3, 1e3)
    step = H.StepHistograms({"a": edges}, edges, samples=100)
    g = torch.Generator().manual_seed(5)
    for length in (300, 77, 300):
        act, grad = torch.randn(length, generator=g), torch.randn(length // 2, generator=g) * 1e-2
        step.take(H.ACT, 0, "a", act)
        step.take(H.GRAD, 0, None, grad)
        step.take(H.GRAD, 1, None, -grad)
        got = step.counts()
        for key, t in (((H.ACT, 0), act), ((H.GRAD, 0), grad), ((H.GRAD, 1), -grad)):
            sample = R.histogram_sample(t, 100).numpy()
            assert got[key].tolist() == _numpy_counts(sample, edges.numpy()), (length, key)
