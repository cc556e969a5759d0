"""The fused (compiled) reductions equal the eager ones, and a monitor using them reads the same numbers."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_health import HealthMonitor
from lightning_health.offline.patients import PatientMLP, patient_loaders
from lightning_health.readings import kernels
from lightning_health.readings import reductions as R
from tests.conftest import trainer_kwargs

pytestmark = pytest.mark.slow  # one inductor compilation per variant (cached on disk afterwards)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bounds", [None, (-1.0, 1.0)])
def test_fused_totals_equal_eager(dtype, bounds):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(37, 29, generator=g).tanh().to(dtype)
    y[0, 0], y[1, 1], y[2, 2] = float("nan"), float("inf"), 0.0
    thresholds = kernels.saturation_thresholds(bounds, 0.01, y.device)
    fused = kernels.activation_totals(y, thresholds)
    eager = R.activation_totals(y, bounds, 0.01)
    torch.testing.assert_close(fused, eager, equal_nan=True, rtol=1e-6, atol=1e-9)  # eager sums in float32
    z = y.nan_to_num(0.0, 0.0, 0.0)
    torch.testing.assert_close(kernels.gradient_totals(z), R.gradient_totals(z), rtol=1e-6, atol=1e-9)
    assert kernels.activation_totals(torch.zeros(0), thresholds)[R.A_COUNT] == 0


def test_a_monitor_with_compiled_reductions_reads_the_same_numbers():
    curves = {}
    for compiled in (False, True):
        monitor = HealthMonitor(every_n_steps=2, compile_reductions=compiled, verbose=False)
        train, _ = patient_loaders()
        pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_steps=6)).fit(PatientMLP(), train)
        curves[compiled] = {m: monitor.curves(m) for m in ("act_mean", "act_std", "zero_fraction", "grad_norm")}
    for metric, per_layer in curves[False].items():
        for layer, points in per_layer.items():
            got = curves[True][metric][layer]
            assert [s for s, _ in got] == [s for s, _ in points]
            assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), (metric, layer)


def test_compile_reductions_is_validated():
    with pytest.raises(TypeError, match="compile_reductions"):
        HealthMonitor(compile_reductions="yes")
