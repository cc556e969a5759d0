"""Dormancy readings against NumPy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_health.readings.dormancy import (
    dormant_mask,
    dormant_scores,
    unit_abs_sums,
    unit_counts,
    update_last_fired,
)


def _np_abs_sums(x: np.ndarray, dim: int) -> np.ndarray:
    axes = tuple(d for d in range(x.ndim) if d != dim % x.ndim)
    return np.abs(x.astype(np.float64)).sum(axis=axes)


def _np_scores(sums: np.ndarray, counts: float) -> np.ndarray:
    means = sums / counts
    return means / means.mean()


@pytest.mark.parametrize(
    ("shape", "dim"),
    [((16, 5), -1), ((4, 7, 6), -1), ((3, 4, 5, 5), 1), ((2, 3, 2, 4, 4), 1), ((6,), -1)],
)
def test_unit_abs_sums_matches_numpy(shape: tuple[int, ...], dim: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    got = unit_abs_sums(x, neuron_dim=dim)
    assert got.dtype == torch.float64
    # float32 inputs are summed per batch in float32 (fast), then widened: float32 accuracy.
    np.testing.assert_allclose(got.numpy(), _np_abs_sums(x.numpy(), dim), rtol=1e-6)
    exact = unit_abs_sums(x.double(), neuron_dim=dim)  # float64 inputs are summed in float64
    np.testing.assert_allclose(exact.numpy(), _np_abs_sums(x.numpy(), dim), rtol=1e-12)
    assert unit_counts(x, dim) * x.shape[dim] == x.numel()
    scratch = torch.full((x.numel() + 3,), float("nan"))  # stale contents must not leak in
    strided = x.transpose(0, -1).contiguous().transpose(0, -1)  # same values and shape, not contiguous
    for buffer in (scratch, scratch[: max(x.numel() // x.shape[0], 1)]):  # all examples at once, or one at a time
        np.testing.assert_allclose(
            unit_abs_sums(strided, dim, scratch=buffer).numpy(), _np_abs_sums(x.numpy(), dim), rtol=1e-6
        )


def test_unit_abs_sums_bf16_is_summed_wide() -> None:
    # 4096 values of ~1.0 in bf16: a bf16 accumulator would stall at 256 (8 mantissa bits).
    x = (torch.rand(4096, 3, generator=torch.Generator().manual_seed(1)) + 0.5).to(torch.bfloat16)
    got = unit_abs_sums(x)
    ref = _np_abs_sums(x.float().numpy(), -1)  # exact values of the bf16 inputs
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)


def test_window_totals_add_up() -> None:
    g = torch.Generator().manual_seed(2)
    batches = [torch.relu(torch.randn(8, 4, 3, 3, generator=g)) for _ in range(3)]
    summed = sum(unit_abs_sums(b, 1) for b in batches)
    whole = unit_abs_sums(torch.cat(batches), 1)
    torch.testing.assert_close(summed, whole, rtol=1e-6, atol=0)
    counts = sum(unit_counts(b, 1) for b in batches)
    assert counts == unit_counts(torch.cat(batches), 1) == 8 * 3 * 9


def test_scores_match_numpy_and_average_to_one() -> None:
    x = torch.relu(torch.randn(64, 10, generator=torch.Generator().manual_seed(3)) + torch.linspace(-3, 1, 10))
    sums, n = unit_abs_sums(x), unit_counts(x)
    scores = dormant_scores(sums, n)
    np.testing.assert_allclose(scores.numpy(), _np_scores(sums.numpy(), n), rtol=1e-12)
    assert scores.mean().item() == pytest.approx(1.0)
    for tau in (0.0, 0.025, 0.1):
        np.testing.assert_array_equal(dormant_mask(sums, n, tau).numpy(), _np_scores(sums.numpy(), n) <= tau)


def test_tau_zero_is_dead_for_relu() -> None:
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(4))
    x[:, :5] -= 100.0  # five units never fire
    a = torch.relu(x)
    never_fired = ~(a > 0).any(dim=0)
    assert torch.equal(dormant_mask(unit_abs_sums(a), unit_counts(a), tau=0.0), never_fired)
    assert never_fired.sum().item() == 5


def test_dormant_but_firing_unit_is_caught_by_positive_tau_only() -> None:
    a = torch.tensor([[1.0, 0.001], [2.0, 0.001]])
    sums = unit_abs_sums(a)
    assert dormant_mask(sums, 2, 0.0).tolist() == [False, False]
    assert dormant_mask(sums, 2, 0.025).tolist() == [False, True]


def test_nan_unit_is_excluded_and_never_dormant() -> None:
    a = torch.tensor([[0.0, 1.0, 3.0, math.nan], [0.0, 1.0, 3.0, 1.0]])
    sums = unit_abs_sums(a)
    assert math.isnan(sums[3].item())
    scores = dormant_scores(sums, 2)
    assert math.isnan(scores[3].item())
    # The layer average is taken over the three finite units only: (0 + 1 + 3) / 3.
    np.testing.assert_allclose(scores[:3].numpy(), [0.0, 0.75, 2.25])
    assert dormant_mask(sums, 2, 0.1).tolist() == [True, False, False, False]


def test_silent_layer_is_entirely_dormant_and_zero_counts_are_no_evidence() -> None:
    assert dormant_mask(torch.zeros(4, dtype=torch.float64), 10, 0.0).tolist() == [True] * 4
    scores = dormant_scores(torch.tensor([0.0, 2.0, 4.0]), torch.tensor([0.0, 1.0, 1.0]))
    assert math.isnan(scores[0].item())
    np.testing.assert_allclose(scores[1:].numpy(), [2 / 3, 4 / 3])


def test_per_unit_counts() -> None:
    sums = torch.tensor([2.0, 2.0])
    np.testing.assert_allclose(dormant_scores(sums, torch.tensor([1.0, 4.0])).numpy(), [1.6, 0.4])


@pytest.mark.parametrize("tau", [-0.1, math.nan, math.inf, "0.1"])
def test_bad_tau(tau: object) -> None:
    with pytest.raises(ValueError, match="Expected `tau` to be a finite number >= 0"):
        dormant_mask(torch.ones(3), 1, tau)  # type: ignore[arg-type]


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="Expected `neuron_dim` to index a dimension"):
        unit_abs_sums(torch.ones(2, 3), neuron_dim=2)
    with pytest.raises(ValueError, match="Expected `counts` to be >= 0"):
        dormant_scores(torch.ones(3), -1)
    with pytest.raises(ValueError, match="Expected `fired` to have the shape"):
        update_last_fired(torch.full((3,), -1), torch.ones(2, dtype=torch.bool), 5)


def test_update_last_fired_keeps_inputs() -> None:
    last = torch.full((4,), -1, dtype=torch.int64)
    fired = torch.tensor([True, False, False, True])
    new = update_last_fired(last, fired, 50)
    assert new.tolist() == [50, -1, -1, 50]
    assert last.tolist() == [-1] * 4
    assert new.dtype == torch.int64
