"""Every reduction against a NumPy reference, including half precision and NaN/Inf."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_health.readings import reductions as R


@pytest.fixture(autouse=True, params=["host-bounds", "device"])
def reduction_path(request, monkeypatch):
    """Every test runs both paths: bounds read on the host (CPU tensors) and the branch-free device one."""
    if request.param == "device":
        monkeypatch.setattr(R, "reads_bounds", lambda x: False)
    return request.param


def _np_ref(x: np.ndarray) -> dict[str, float]:
    return {
        "count": x.size,
        "sum": float(np.sum(x, dtype=np.float64)),
        "sumsq": float(np.sum(x.astype(np.float64) ** 2)),
        "min": float(np.min(x)),
        "max": float(np.max(x)),
        "zeros": float(np.sum(x == 0)),
        "nonfinite": float(np.sum(~np.isfinite(x))),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_activation_totals_match_numpy(dtype):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(64, 33, generator=g).relu().to(dtype)
    ref = _np_ref(y.float().numpy())
    t = R.activation_totals(y).tolist()
    assert t[R.A_COUNT] == ref["count"]
    assert t[R.A_SUM] == pytest.approx(ref["sum"], rel=1e-6)
    assert t[R.A_SUMSQ] == pytest.approx(ref["sumsq"], rel=1e-6)
    assert t[R.A_MIN] == ref["min"] and t[R.A_MAX] == ref["max"]
    assert t[R.A_ZEROS] == ref["zeros"]
    assert t[R.A_NONFINITE] == 0


def test_a_collapsed_layer_keeps_a_precise_std():
    # mean >> std: E[x^2] - mean^2 would cancel catastrophically without centring
    x = 5.0 + torch.randn(256, 1024, generator=torch.Generator().manual_seed(5)) * 1e-4
    d = R.derive_activation(R.activation_totals(x).tolist())
    assert d["act_std"] == pytest.approx(x.double().std().item(), rel=1e-3)


@pytest.mark.parametrize(
    "shape,dim",
    [((256, 1024), -1), ((5000, 64), -1), ((4, 600, 32), -1), ((8, 16, 9, 9), 1), ((3, 7), 0), ((1, 5), -1)],
)
def test_unit_moments_match_float64_and_keep_a_near_constant_unit_precise(shape, dim):
    """Per-unit sums within 1e-5 of float64 (the 5000-row case spans several statistics calls), and a
    unit stuck at 5 +- 1e-4 keeps its std: the collapse reading compares it with the layer's RMS."""
    from lightning_health.readings.collapse import unit_moments

    g = torch.Generator().manual_seed(11)
    y = torch.nn.functional.gelu(torch.randn(*shape, generator=g) * 2)
    axis = dim % y.dim()
    stuck = [slice(None)] * y.dim()
    stuck[axis] = 0
    y[tuple(stuck)] = 5.0 + 1e-4 * torch.randn(y[tuple(stuck)].shape, generator=g)
    if y.shape[axis] > 2:  # just too spread to be read again shifted (var / mean square = 4e-4), and silent
        stuck[axis] = 1
        y[tuple(stuck)] = 5.0 + 0.1 * torch.randn(y[tuple(stuck)].shape, generator=g)
        stuck[axis] = 2
        y[tuple(stuck)] = 0.0
    x = y.double().numpy()
    other = tuple(d for d in range(x.ndim) if d != axis)
    sums, squares = x.sum(axis=other), np.square(x).sum(axis=other)
    m = unit_moments(y, dim).numpy()
    units = y.shape[axis]
    np.testing.assert_allclose(m[:units], sums, rtol=1e-5, atol=1e-5 * np.abs(x).sum(axis=other).max())
    np.testing.assert_allclose(m[units:], squares, rtol=1e-5)
    n = x.size / units
    if n >= 2:
        var = m[units:] / n - (m[:units] / n) ** 2
        assert var[0] == pytest.approx(x.var(axis=other)[0], rel=1e-2)
        assert var[1] == pytest.approx(x.var(axis=other)[1], rel=1e-2)


def test_scratch_buffer_is_reused_and_gives_the_same_totals():
    scratch = R.Scratch()
    x = torch.randn(100, 7)
    buf = scratch.get(x)
    torch.testing.assert_close(R.activation_totals(x, scratch=buf), R.activation_totals(x))
    assert scratch.get(torch.randn(50)) is buf  # smaller tensors reuse it
    assert scratch.get(torch.randn(1000)).numel() == 1000  # a larger one grows it


def test_sum_of_squares_of_large_half_values_is_finite():
    # 60000^2 overflows fp16 and bf16 maxima are ~3e38: squares must accumulate in float64.
    y = torch.full((1000,), 60000.0, dtype=torch.float16)
    t = R.activation_totals(y)
    assert math.isfinite(t[R.A_SUMSQ].item())
    assert t[R.A_SUMSQ].item() == pytest.approx(1000 * 60000.0**2)
    big = torch.full((10,), 1e30, dtype=torch.bfloat16)
    assert math.isfinite(R.gradient_totals(big)[R.G_SUMSQ].item())


def test_large_tensors_are_reduced_in_chunks_with_the_same_totals(monkeypatch):
    g = torch.Generator().manual_seed(6)
    y = torch.randn(10, 103, generator=g).tanh()
    y[3, 7] = float("inf")
    whole_act, whole_grad = R.activation_totals(y, (-1.0, 1.0)), R.gradient_totals(y)
    monkeypatch.setattr(R, "CHUNK", 64)  # 17 chunks, the last one short
    monkeypatch.setattr(R, "HOST_PASS", 24)  # host path: each chunk's written passes in 3 pieces, one short
    scratch = R.Scratch()
    assert scratch.get(y).numel() == (24 if R.reads_bounds(y) else 64)  # the buffer never exceeds one pass
    torch.testing.assert_close(R.activation_totals(y, (-1.0, 1.0), scratch=scratch.get(y)), whole_act, equal_nan=True)
    torch.testing.assert_close(R.gradient_totals(y, scratch=scratch.get(y)), whole_grad, equal_nan=True)
    finite = y.clone()
    finite[3, 7] = -5.0
    chunked = R.activation_totals(finite).tolist()
    assert chunked[R.A_MIN] == -5.0 and chunked[R.A_MAX] == finite.max().item()
    assert chunked[R.A_SUMSQ] == pytest.approx(finite.double().square().sum().item(), rel=1e-6)


def test_written_passes_in_pieces_of_a_short_buffer_match_numpy(monkeypatch):
    """One-signed values (shifted moments), zeros, saturation on both sides and NaN, each written
    pass going through a chunk in pieces of a scratch shorter than it, against NumPy."""
    monkeypatch.setattr(R, "CHUNK", 500)
    monkeypatch.setattr(R, "HOST_PASS", 96)
    g = torch.Generator().manual_seed(11)
    y = torch.rand(37, 41, generator=g) * 0.98 + 0.01  # a sigmoid's range, nothing at either bound
    y[::5, 3] = 0.0
    y[2, ::3] = 1.0
    scratch = R.Scratch()
    for values in (y, y * -1.0):
        ref = _np_ref(values.numpy())
        low, high = (0.05, 0.95) if values is y else (-0.95, -0.05)
        t = R.activation_totals(values, scratch=scratch.get(values), thresholds=(low, high)).tolist()
        assert t[R.A_SUM] == pytest.approx(ref["sum"], rel=1e-6)
        assert t[R.A_SUMSQ] == pytest.approx(ref["sumsq"], rel=1e-6)
        assert t[R.A_ZEROS] == ref["zeros"]
        x = values.numpy()
        assert t[R.A_SATURATED] == float(np.sum((x <= low) | (x >= high)))
    broken = y.clone()
    broken[30, 40] = float("nan")
    broken[0, 0] = float("inf")
    t = R.activation_totals(broken, scratch=scratch.get(broken)).tolist()
    assert t[R.A_NONFINITE] == 2 and t[R.A_ZEROS] == _np_ref(broken.numpy())["zeros"]


def test_subnormal_values_give_finite_moments_and_no_nonfinite_count():
    # Scaling 1e-40 up towards 1 must not overflow the float32 scale factor (it read NaN before).
    y = torch.tensor([1e-40, 2e-40, 0.0])
    for totals, total, sumsq, nonfinite in (
        (R.activation_totals(y).tolist(), R.A_SUM, R.A_SUMSQ, R.A_NONFINITE),
        (R.gradient_totals(y).tolist(), R.G_SUM, R.G_SUMSQ, R.G_NONFINITE),
    ):
        assert totals[total] == pytest.approx(3e-40, rel=1e-4)
        assert math.isfinite(totals[sumsq]) and totals[nonfinite] == 0


def test_nonfinite_are_counted_and_moments_read_nan():
    y = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 0.0])
    t = R.activation_totals(y).tolist()
    assert t[R.A_NONFINITE] == 3
    assert t[R.A_ZEROS] == 1
    derived = R.derive_activation(t)
    assert math.isnan(derived["act_mean"])
    g = R.gradient_totals(y).tolist()
    assert g[R.G_NONFINITE] == 3


def test_saturation_counts_outputs_near_bounds():
    y = torch.tensor([-1.0, -0.995, -0.5, 0.0, 0.97, 0.985, 1.0])
    # margin 1% of the range 2 => within 0.02 of -1 or +1
    t = R.activation_totals(y, bounds=(-1.0, 1.0), margin=0.01).tolist()
    ref = float(np.sum((y.numpy() <= -0.98) | (y.numpy() >= 0.98)))
    assert t[R.A_SATURATED] == ref == 4
    assert R.activation_totals(y, bounds=None).tolist()[R.A_SATURATED] == 0


def test_derived_moments_match_numpy():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(1000, generator=g) * 3 + 2
    d = R.derive_activation(R.activation_totals(y).tolist())
    x = y.numpy().astype(np.float64)
    assert d["act_mean"] == pytest.approx(x.mean(), rel=1e-6)
    assert d["act_std"] == pytest.approx(x.std(ddof=1), rel=1e-6)
    assert d["zero_fraction"] == 0
    gd = R.derive_gradient(R.gradient_totals(y).tolist())
    assert gd["grad_std"] == pytest.approx(x.std(ddof=1), rel=1e-6)
    assert gd["grad_max"] == pytest.approx(np.abs(x).max())
    assert gd["grad_norm"] == pytest.approx(np.linalg.norm(x), rel=1e-6)


def test_combining_totals_equals_totals_of_the_union():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(50, generator=g), torch.randn(70, generator=g) * 5
    both = R.activation_totals(torch.cat([a, b]))
    combined = R.combine_activation_totals(R.activation_totals(a), R.activation_totals(b))
    torch.testing.assert_close(combined, both, rtol=1e-6, atol=1e-9)
    gb = R.gradient_totals(torch.cat([a, b]))
    torch.testing.assert_close(
        R.combine_gradient_totals(R.gradient_totals(a), R.gradient_totals(b)), gb, rtol=1e-6, atol=1e-9
    )
    empty = R.empty_activation_totals()
    torch.testing.assert_close(R.combine_activation_totals(empty, both), both)


def test_empty_tensors_give_identity_totals():
    assert R.activation_totals(torch.zeros(0, 5))[R.A_COUNT].item() == 0
    assert R.derive_activation(R.activation_totals(torch.zeros(0)).tolist()) == {}
    assert R.unit_fire_mask(torch.zeros(0, 5), -1).tolist() == [False] * 5


@pytest.mark.parametrize("shape,dim", [((6, 5), -1), ((4, 3, 5), -1), ((4, 3, 7, 7), 1)])
def test_fire_mask_matches_numpy(shape, dim):
    g = torch.Generator().manual_seed(3)
    y = (torch.randn(*shape, generator=g) - 1.5).relu()
    x = y.numpy()
    axis = dim % x.ndim
    other = tuple(d for d in range(x.ndim) if d != axis)
    ref = (x > 0).any(axis=other)
    assert R.unit_fire_mask(y, dim).numpy().tolist() == ref.tolist()


@pytest.mark.parametrize("shape,dim", [((300, 64), -1), ((4, 3, 5), -1), ((4, 3, 7, 7), 1), ((1, 8), -1)])
def test_fired_from_the_per_unit_sums_matches_numpy_on_a_never_negative_activation(shape, dim):
    from lightning_health.readings.collapse import unit_moments

    g = torch.Generator().manual_seed(5)
    y = (torch.randn(*shape, generator=g) - 2.0).relu()  # many silent units
    first = [slice(None)] * y.dim()
    first[dim % y.dim()] = 0
    y[tuple(first)] = 0.0
    y.reshape(-1)[0] = 7.0  # unit 0 fires only on its first value, the shift's reference (the rest are 0)
    x = y.numpy()
    ref = (x > 0).any(axis=tuple(d for d in range(x.ndim) if d != dim % x.ndim))
    moments = unit_moments(y, dim)
    assert R.fired_from_sums(moments[: moments.numel() // 2]).numpy().tolist() == ref.tolist()


def test_fire_mask_bf16_and_nan_units():
    y = torch.tensor([[0.0, 0.5, float("nan")], [0.0, 0.0, 1.0]], dtype=torch.bfloat16)
    assert R.unit_fire_mask(y, -1).tolist() == [False, True, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_histogram_counts_equal_numpy_exactly(dtype):
    g = torch.Generator().manual_seed(4)
    values = (torch.randn(5000, generator=g) * 3).to(dtype)
    values[::97] = float("nan")
    values[::101] = float("inf")
    edges = R.symlog_edges(32, 1e-3, 5.0)
    sample = R.histogram_sample(values, 1024)
    counts = R.histogram_counts(sample, edges).tolist()
    s = sample.numpy()
    e = edges.numpy()
    finite = s[np.isfinite(s)]
    inside, _ = np.histogram(finite, bins=e)
    assert counts[1:-2] == inside.tolist()
    assert counts[0] == np.sum(finite < e[0])
    assert counts[-2] == np.sum(finite > e[-1])
    assert counts[-1] == np.sum(~np.isfinite(s))
    assert sum(counts) == s.size


def test_histogram_edge_values_and_infinities_land_where_numpy_puts_them():
    edges = torch.tensor([-1.0, 0.0, 1.0])
    x = torch.tensor([-1.0, 0.0, 1.0, -float("inf"), float("inf"), 1.0000001, -1.0000001])
    boundaries = R.bucket_boundaries(edges)
    assert R.histogram_counts(x, edges).tolist() == [1.0, 1.0, 2.0, 1.0, 2.0]
    assert torch.equal(R.histogram_counts(x, edges, boundaries), R.histogram_counts(x, edges))
    assert np.histogram(x[:3].numpy(), bins=edges.numpy())[0].tolist() == [1, 2]


def test_histogram_sample_is_fixed_size_and_strided():
    x = torch.arange(10_000, dtype=torch.float32)
    s = R.histogram_sample(x, 1000)
    assert s.numel() == 1000
    assert s[:3].tolist() == [0.0, 10.0, 20.0]
    assert R.histogram_sample(x[:10], 1000).numel() == 10


def test_symlog_edges_are_fixed_and_symmetric():
    e = R.symlog_edges(8, 1e-2, 1e2)
    assert e.numel() == 9
    assert torch.all(e[1:] > e[:-1])
    torch.testing.assert_close(e, -e.flip(0))
    with pytest.raises(ValueError, match="histogram_bins"):
        R.symlog_edges(7, 1e-2, 1.0)


def test_given_moments_replace_the_moment_passes_only_while_values_are_finite():
    from lightning_health.readings.collapse import unit_moments

    g = torch.Generator().manual_seed(7)
    y = torch.randn(40, 9, generator=g).relu()
    given = unit_moments(y).view(2, -1).sum(dim=1)
    torch.testing.assert_close(R.activation_totals(y, moments=given), R.activation_totals(y), rtol=1e-6, atol=1e-9)
    y[3, 4] = float("nan")
    with_nan = R.activation_totals(y, moments=torch.tensor([1.0, 2.0], dtype=torch.float64)).tolist()
    assert math.isnan(with_nan[R.A_SUM]) and with_nan[R.A_NONFINITE] == 1  # the caller's numbers are not used
