"""The W&B dashboards on real offline runs of the demo's patients, read back from the run directories.

Two runs of the demo network, healthy and exploding (NaN from step 3), each with Lightning's
``WandbLogger`` in offline mode and the real ``wandb`` library; the records of each run's ``.wandb``
file and the table files next to it are what the W&B UI would be given on ``wandb sync``.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest

from lightning_health import HealthMonitor
from lightning_health.offline.demo import EXPLODING, HEALTHY, Patient
from lightning_health.offline.patients import PatientMLP, patient_loaders
from lightning_health.sinks.wandb import CHART_METRICS, CHART_PREFIX
from tests.conftest import trainer_kwargs
from tests.wandb_files import read_run

wandb = pytest.importorskip("wandb")

LAYERS = ["net.1", "net.3", "net.5", "net.7"]


def _train(patient: Patient, save_dir: Path) -> tuple[dict[str, Any], Path, HealthMonitor]:
    from lightning.pytorch.loggers import WandbLogger

    pl.seed_everything(11, verbose=False)
    logger = WandbLogger(project="health-demo", name=patient.name, save_dir=str(save_dir), offline=True)
    monitor = HealthMonitor(every_n_steps=1, dead_window=2, verbose=False)
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=2, logger=logger))  # 10 steps
    train, val = patient_loaders()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the sick run's critical findings warn, as they should
            trainer.fit(PatientMLP(init=patient.init, lr=patient.lr, seed=11), train, val)
        run_dir = Path(logger.experiment.dir).parent
    finally:
        wandb.finish()
    return read_run(run_dir), run_dir, monitor


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], Path, HealthMonitor]]:
    mp = pytest.MonkeyPatch()
    save_dir = tmp_path_factory.mktemp("wandb")
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_DIR", str(save_dir))
    try:
        yield {patient.name: _train(patient, save_dir) for patient in (HEALTHY, EXPLODING)}
    finally:
        mp.undo()


def _last_table(run: dict[str, Any], run_dir: Path, key: str) -> tuple[int, dict[str, Any]]:
    rows = [row for row in run["history"] if f"{key}/path" in row]
    assert rows, f"no {key} in the run's history"
    return rows[-1]["trainer/global_step"], json.loads((run_dir / "files" / rows[-1][f"{key}/path"]).read_text())


@pytest.mark.parametrize("metric", [metric for metric, _ in CHART_METRICS])
def test_line_series_chart_overlays_every_layer(runs: dict[str, Any], metric: str) -> None:
    run, run_dir, monitor = runs["healthy"]
    key = CHART_PREFIX + metric
    # the custom chart: W&B's line-series panel over the table logged next to it
    panel = run["config"][f"_wandb/visualize/{key}"]
    assert panel["panel_config"]["panelDefId"] == "wandb/lineseries/v0"
    assert panel["panel_config"]["stringSettings"]["xname"] == "trainer/global_step"
    assert f'"value": "{key}_table"' in json.dumps(panel["panel_config"]["userQuery"])
    # its table: one line per layer, named, every sampled step; refreshed at the end of training
    step, table = _last_table(run, run_dir, f"{key}_table")
    assert step == 10 and table["columns"] == ["step", "lineKey", "lineVal"]
    lines: dict[str, list[tuple[int, float]]] = {}
    for x, layer, y in table["data"]:
        lines.setdefault(layer, []).append((x, y))
    assert list(lines) == LAYERS
    for layer, points in lines.items():
        expected = monitor.curves(metric)[layer]
        assert [x for x, _ in points] == [s for s, _ in expected], (metric, layer)
        assert [y for _, y in points] == pytest.approx([v for _, v in expected], rel=1e-6), (metric, layer)


def test_line_series_leaves_nan_points_out_of_the_line(runs: dict[str, Any]) -> None:
    run, run_dir, monitor = runs["exploding"]
    _, table = _last_table(run, run_dir, f"{CHART_PREFIX}act_std_table")
    values = {(x, layer): y for x, layer, y in table["data"]}
    for layer in LAYERS:
        for step, value in monitor.curves("act_std")[layer]:
            assert values[(step, layer)] == (None if math.isnan(value) else pytest.approx(value)), (layer, step)
    assert values[(9, "net.1")] is None  # NaN from step 3: a gap in the chart, not a point at 0


def test_summary_ranks_the_nan_run_worst(runs: dict[str, Any]) -> None:
    healthy, exploding = runs["healthy"][0]["summary"], runs["exploding"][0]["summary"]
    assert (healthy["health/status"], healthy["health/verdict"]) == (0, "healthy")
    assert (exploding["health/status"], exploding["health/verdict"]) == (2, "critical")
    assert (healthy["health/nonfinite_layers"], exploding["health/nonfinite_layers"]) == (0, 4)
    assert exploding["health/first_nonfinite_step"] == 3 and "health/first_nonfinite_step" not in healthy
    # a layer gone NaN is the worst layer and counts as all dead, so no sort puts the NaN run on top as healthiest
    assert exploding["health/worst_dead_fraction"] == 1.0 > healthy["health/worst_dead_fraction"]
    assert exploding["health/worst/dead_fraction"] == 1.0  # the live status scalar's last value agrees
    summaries = {"healthy": healthy, "exploding": exploding}
    for key in ("health/status", "health/worst_dead_fraction", "health/nonfinite_layers", "health/n_critical_findings"):
        worst_first = sorted(summaries, key=lambda name: summaries[name][key], reverse=True)
        assert worst_first == ["exploding", "healthy"], key
    assert healthy["health/n_findings"] == 0 and healthy["health/first_finding"] == ""
