"""Smoke test of the benchmark harness (issue 5): tiny workloads, a few steps, no timing assertions."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from benchmarks import run
from benchmarks.anchors import host_statistics
from benchmarks.harness import VARIANTS
from benchmarks.workloads import WORKLOADS, make_workload


@pytest.mark.parametrize("name", WORKLOADS)
def test_tiny_workload_trains_one_step(name: str) -> None:
    module, loader = make_workload(name, num_batches=2, tiny=True)
    batch = next(iter(loader))
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert len(loader) == 2


def test_workload_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="Expected `name` to be one of"):
        make_workload("resnet", num_batches=1)


def test_host_statistics_match_numpy_definitions() -> None:
    import numpy as np

    values = np.array([[0.0, 1.0], [2.0, -3.0]], dtype=np.float32)
    stats, counts, edges = host_statistics(values, bins=4)
    assert stats["zero_fraction"] == 0.25
    assert stats["min"] == -3.0 and stats["max"] == 2.0
    assert counts.sum() == 4 and len(edges) == 5


@pytest.mark.slow
def test_quick_run_writes_a_row_for_every_variant(tmp_path: Path) -> None:
    out = tmp_path / "performance.md"
    report = run.main(["--quick", "--workloads", "mlp", "--out", str(out)])
    assert out.read_text() == report
    for variant in VARIANTS:
        assert f"| {variant.label} |" in report, variant.name
    assert "| date |" in report and "| machine |" in report
    assert "python -m benchmarks.run --quick --workloads mlp" in report
    assert "Reductions against one read" in report


def test_update_ratio_cost_variants_differ_only_in_the_update_readings() -> None:
    from benchmarks.harness import make_callbacks
    from benchmarks.update_ratio_cost import VARIANTS as COST_VARIANTS

    monitors = {v.name: make_callbacks(v)[0] for v in COST_VARIANTS}
    assert {name: m.update_ratio_max_bytes for name, m in monitors.items()} == {
        "health@50": 2**29,
        "health@50-noupdate": 0,
        "health@1": 2**29,
        "health@1-noupdate": 0,
    }
    assert {name: m.every_n_steps for name, m in monitors.items()} == {
        "health@50": 50,
        "health@50-noupdate": 50,
        "health@1": 1,
        "health@1-noupdate": 1,
    }


def test_per_layer_benchmark_reports_a_row_per_depth_and_a_fit() -> None:
    from benchmarks.per_layer import fit_line
    from benchmarks.per_layer import run as per_layer

    assert fit_line([10, 30, 100], [3.0, 7.0, 21.0]) == pytest.approx((1.0, 0.2))
    table = per_layer([2, 3], steps=2, repeats=1)
    assert "| 2 |" in table and "| 3 |" in table and "ms x layers" in table


def test_update_ratio_readings_alone_are_timed_on_the_bare_workload() -> None:
    from benchmarks.update_ratio_cost import direct_cost, snapshot_bytes

    step_ms, extra_ms = direct_cost("mlp", tiny=True, repeats=2)
    assert step_ms > 0 and math.isfinite(extra_ms)
    module, _ = make_workload("mlp", num_batches=1, tiny=True)
    assert snapshot_bytes("mlp", True) == 4 * sum(p.numel() for p in module.parameters())


@pytest.mark.slow
def test_peak_memory_reads_the_same_peak_for_the_same_work() -> None:
    """Identical work (no monitor, with and without a logger) reads the same peak to within a few MiB
    (glibc's retained blocks move it by tens); the weight copy never lowers a peak. How much of the
    copy shows depends on what else peaks on the machine, so no share of it is asserted."""
    from benchmarks.harness import BenchmarkConfig, run_benchmark
    from benchmarks.peak_memory import VARIANTS as MEMORY_VARIANTS
    from benchmarks.peak_memory import table

    config = BenchmarkConfig.sized(
        ["mlp"], MEMORY_VARIANTS, quick=True, repeats=1, steps=0, dense_steps=0, live_memory=True,
        max_foreign_cpu=float("inf"),
    )  # fmt: skip
    config = dataclasses.replace(config, tiny=False, steps=50, warmup=1)  # sampled at 0 and 50: the real MLP
    trials = {t.variant: t for t in run_benchmark(config).trials}
    # library code pages first read in a fresh install move it by about 1 MiB
    assert abs(trials["none"].growth_mib - trials["none+tb"].growth_mib) < 4.0
    assert trials["health@50"].growth_mib >= trials["health@50-noupdate"].growth_mib - 1.0
    assert trials["health@50"].growth_mib <= trials["health@50-exact"].growth_mib + 1.0  # a sample, not the weights
    assert "| mlp | no monitor |" in "\n".join(table(list(trials.values()), ["mlp"]))


def test_gpu_check_runs_its_sections_and_finds_the_planted_nan(tmp_path: Path) -> None:
    """The GPU check's script at smoke size on the CPU: the reductions agree with NumPy, a sync count
    is taken per step, the CNN whose weight turns NaN mid-run gets a non-finite finding, and the
    monitor warned of nothing it could not read."""
    import json

    from benchmarks import gpu_check

    out = tmp_path / "gpu.json"
    gpu_check.main(["--small", "--sections", "exact,syncs,findings", "--sync-every", "5", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["exact"] == {"cases": 9, "problems": []}
    assert result["syncs/cnn/5"]["sampled"]["steps"] == 2
    assert any("NaN/Inf" in line for line in result["findings/cnn-nan@10"])
    assert not any("NaN/Inf" in line for line in result["findings/cnn@1"])
    assert result["monitor_warnings"] == {}  # nothing skipped: GPT-2's attention is read under bf16-mixed too


def test_the_sampled_update_ratio_benchmark_compares_against_the_exact_one() -> None:
    """Two steps of the benchmark's MLP under Adam: every sampled reading within 5% of the exact copy's."""
    from benchmarks.update_sample import errors

    found = errors("MLP, Adam", steps=2)
    assert len(found) == 6 and max(found) < 0.05
