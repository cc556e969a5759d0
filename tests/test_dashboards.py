"""Dashboards end to end: real fits, TensorBoard event files, an offline W&B run and a CSV file read back."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from torch import nn

from lightning_health import HealthMonitor
from lightning_health.diagnosis import Finding
from lightning_health.offline.patients import patient_loaders
from lightning_health.readings.reductions import histogram_sample
from lightning_health.sinks import SinkBase, SinkSet
from lightning_health.sinks.base import Histogram
from lightning_health.sinks.format import findings_markdown, run_summary
from lightning_health.sinks.heatmap import heatmap_grid, render_heatmap
from lightning_health.sinks.tensorboard import panel_layout, raw_histogram_args
from tests.conftest import read_tb_scalars, trainer_kwargs
from tests.wandb_files import read_run

SAMPLES = 64  # 16 examples x 16 units = 256 values per tensor: histograms use every 4th value


class Spike(nn.ReLU):
    """A ReLU that, when told, plants NaN, +Inf and an out-of-range value in its output."""

    spike = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.spike:
            y = y.clone()
            y[0, 0], y[0, 4], y[0, 8] = math.nan, math.inf, 1e31
        return y


class Probe(pl.LightningModule):
    """8-16-4 with one monitored activation whose output and gradient the test keeps per step.

    Ten of the 16 units get a bias of -100, so they never fire: ``net.1`` is 62.5% dead (critical).
    """

    def __init__(self, act: nn.Module | None = None, spike_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), act or nn.ReLU(), nn.Linear(16, 4))
        with torch.no_grad():
            self.net[0].bias[:10] = -100.0
        self.spike_at = spike_at
        self.acts: dict[int, torch.Tensor] = {}
        self.grads: dict[int, torch.Tensor] = {}
        self.net[1].register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if self.training and output.requires_grad:
            step = self.trainer.global_step
            self.acts[step] = output.detach().clone()
            output.register_hook(lambda g: self.grads.__setitem__(step, g.detach().clone()))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if isinstance(self.net[1], Spike):
            self.net[1].spike = self.trainer.global_step == self.spike_at
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, _ = batch
        self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(model: pl.LightningModule, monitor: HealthMonitor, loggers: Any = False, epochs: int = 2) -> pl.Trainer:
    train, val = patient_loaders()
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=epochs, logger=loggers))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the critical finding warns, as it should
        trainer.fit(model, train, val)
    return trainer


def _accumulator(logdir: str | Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in Path(logdir).rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def _expected_counts(values: torch.Tensor, edges: np.ndarray) -> list[float]:
    """NumPy's histogram of the same strided sample, plus the open ends (nonfinite values excluded)."""
    sample = histogram_sample(values, SAMPLES).numpy()
    finite = sample[np.isfinite(sample)]
    inside, _ = np.histogram(finite, bins=edges)
    return [float((finite < edges[0]).sum()), *map(float, inside), float((finite > edges[-1]).sum())]


def _monitor(**kw: Any) -> HealthMonitor:
    base: dict[str, Any] = {
        "every_n_steps": 2, "dead_window": 2, "histogram_samples": SAMPLES, "heatmap_every_n_samples": 2,
        "verbose": False, "layers": [r"net.1"], "burst_steps": 0,
    }  # fmt: skip
    base.update(kw)
    return HealthMonitor(**base)


# -- TensorBoard ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_tensorboard_histograms_equal_numpy_on_the_same_sample(tmp_path, act):
    model = Probe(act())
    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit(model, _monitor(), [logger])  # 10 steps, sampled at 0, 2, 4, 6, 8
    acc = _accumulator(logger.log_dir)
    for tag, kept in (("health/activations/net.1", model.acts), ("health/gradients/net.1", model.grads)):
        events = acc.Histograms(tag)
        assert [e.step for e in events] == [0, 2, 4, 6, 8]
        for event in events:
            limits = np.array(event.histogram_value.bucket_limit)
            edges = limits[:-1]  # the last limit closes the "above" bucket
            assert list(event.histogram_value.bucket) == _expected_counts(kept[event.step], edges), (tag, event.step)
            assert event.histogram_value.num == SAMPLES
    act_edges = np.array(acc.Histograms("health/activations/net.1")[0].histogram_value.bucket_limit)[:-1]
    if act is nn.Tanh:  # bounded: linear over the bounds
        np.testing.assert_allclose(act_edges[[0, -1]], [-1.0, 1.0])
        np.testing.assert_allclose(np.diff(act_edges), 2 / 64, rtol=1e-5)
    else:  # unbounded: symmetric log edges around zero
        assert act_edges[32] == 0 and act_edges[0] == -act_edges[-1] and act_edges[-1] >= 1e3


def test_nan_inf_and_out_of_range_values_are_counted_not_dropped(tmp_path):
    model = Probe(Spike(), spike_at=4)
    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit(model, _monitor(), [logger], epochs=1)
    acc = _accumulator(logger.log_dir)
    (event,) = [e for e in acc.Histograms("health/activations/net.1") if e.step == 4]
    buckets = list(event.histogram_value.bucket)
    edges = np.array(event.histogram_value.bucket_limit)[:-1]
    assert buckets == _expected_counts(model.acts[4], edges)
    assert buckets[-1] == 1  # 1e31 in the "above" bucket (the sample holds elements 0, 4, 8, ...)
    assert event.histogram_value.num == SAMPLES - 2  # NaN and +Inf left out of the histogram ...
    assert all(math.isfinite(x) for x in (*buckets, event.histogram_value.sum, event.histogram_value.max))
    scalars = read_tb_scalars(logger.log_dir)
    assert dict(scalars["health/nonfinite/net.1"])[4] == 2  # ... and counted exactly as a scalar
    # the share beyond the edges is a scalar too: 1 of the 64 sampled values; the NaN makes the step critical
    assert dict(scalars["health/act_out_of_range/net.1"])[4] == pytest.approx(1 / SAMPLES)
    assert dict(scalars["health/act_out_of_range/net.1"])[2] == 0.0
    assert dict(scalars["health/status"])[4] == 2 and dict(scalars["health/worst/nonfinite_layers"])[4] == 1
    assert dict(scalars["health/worst/dead_fraction"])[4] == 1.0  # a NaN layer counts as the worst


def test_a_due_picture_waits_while_pictures_would_take_over_two_percent_of_the_time(tmp_path):
    ticks = itertools.count()
    monitor = _monitor(every_n_steps=1, heatmap_every_n_samples=1)
    monitor._publish.clock = lambda: float(next(ticks))  # each call one second later: every render costs 1 s
    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit(Probe(), monitor, [logger], epochs=12)  # 60 sampled steps, each owes a picture
    from lightning_health.sinks.depth_profile import PROFILE_TAG

    steps = [i.step for i in _accumulator(logger.log_dir).Images(PROFILE_TAG)]  # drawn from step 0 on
    # step 0 draws (nothing spent yet); the next fits 1 s / 2% = 50 s later, at step 50; then only the final one
    assert steps[:2] == [0, 50] and len(steps) == 3 and steps[2] >= 59


def test_tensorboard_panel_findings_and_heatmap(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.util import tensor_util

    model = Probe()
    monitor = _monitor(every_n_steps=1, heatmap_every_n_samples=3)
    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit(model, monitor, [logger])  # 10 sampled steps: 0..9
    acc = _accumulator(logger.log_dir)
    scalars = read_tb_scalars(logger.log_dir)
    assert [s for s, _ in scalars["health/act_std/net.1"]] == list(range(10))
    assert [s for s, _ in scalars["health/dead_fraction/net.1"]] == list(range(1, 10))  # window of 2

    # The diagnosis panel: written once, the status line first, then one chart per layer, then per metric.
    (config,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(config.tensor_proto).item())
    assert [c.title for c in layout.category][:3] == [
        "health: status", "health: dead fraction per layer", "health: gradient std per layer"
    ]  # fmt: skip
    status = layout.category[0]
    for chart, tag in zip(
        status.chart, ["health/status", "health/worst/nonfinite_layers", "health/worst/dead_fraction"]
    ):
        (regex,) = chart.multiline.tag
        assert {t for t in scalars if re.search(regex, t)} == {tag}
    (per_layer,) = layout.category[1].chart
    assert per_layer.title == "1. net.1"
    assert {t for t in scalars if re.search(per_layer.multiline.tag[0], t)} == {"health/dead_fraction/net.1"}
    assert [s for s, _ in scalars["health/status"]] == list(range(10))
    assert dict(scalars["health/status"])[1] == 2  # 62.5% dead: critical from step 1
    np.testing.assert_allclose([v for _, v in scalars["health/worst/dead_fraction"]], [10 / 16] * 9)

    # Findings as Markdown text, written only when the diagnosis changed.
    texts = acc.Tensors("health/findings/text_summary")
    bodies = [tensor_util.make_ndarray(t.tensor_proto).item().decode() for t in texts]
    assert texts[0].step == 0 and "No problems found" in bodies[0]
    assert texts[1].step == 1 and "| net.1 | dead units | **critical** | 1 |" in bodies[1]
    assert len(texts) < 5

    # The heatmap every 3 samples and at the end; the last one is exactly the monitor's curves rendered.
    images = acc.Images("health/dead_fraction_heatmap")
    steps = [i.step for i in images]  # mid-run re-renders wait for the picture budget (wall time)
    assert steps[0] == 2 and steps[-1] == 10 and set(steps) <= {2, 5, 8, 10}
    from PIL import Image

    last = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(last, render_heatmap(monitor.curves("dead_fraction"), ["net.1"]))
    assert last.shape[1] >= 800  # a matplotlib figure at its natural size, not a thumbnail
    # the findings are written once more at the end, "as of" the last step
    assert texts[-1].step == 10 and "as of step 10" in bodies[-1]


def test_dashboard_off_keeps_scalars_and_histograms_only(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit(Probe(), _monitor(dashboard=False), [logger], epochs=1)
    tags = _accumulator(logger.log_dir).Tags()
    assert "health/act_std/net.1" in tags["scalars"] and "health/activations/net.1" in tags["histograms"]
    assert not tags["images"] and not tags["tensors"]


@pytest.mark.parametrize("as_path", [True, False])
def test_plain_summary_writer_user(tmp_path, as_path):
    from torch.utils.tensorboard import SummaryWriter

    logdir = tmp_path / "runs" / "exp1"
    writer = str(logdir) if as_path else SummaryWriter(log_dir=str(logdir))
    _fit(Probe(), _monitor(writer=writer), loggers=False, epochs=1)
    if not as_path:
        writer.close()  # the user's writer: the monitor flushes it, the user closes it
    acc = _accumulator(logdir)
    tags = acc.Tags()
    assert [e.step for e in acc.Scalars("health/act_std/net.1")] == [0, 2, 4]
    assert "health/gradients/net.1" in tags["histograms"]
    assert "health/dead_fraction_heatmap" in tags["images"]
    assert {"custom_scalars__config__", "health/findings/text_summary"} <= set(tags["tensors"])


def test_writer_is_validated_by_name():
    with pytest.raises(TypeError, match="writer"):
        HealthMonitor(writer=42)
    with pytest.raises(ValueError, match="heatmap_every_n_samples"):
        HealthMonitor(heatmap_every_n_samples=0)


# -- Weights & Biases --------------------------------------------------------------------------------------
def test_wandb_offline_run_holds_history_histograms_table_config_and_summary(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    model = Probe()
    logger = WandbLogger(project="health", save_dir=str(tmp_path), offline=True)
    monitor = _monitor(heatmap_every_n_samples=2)
    try:
        _fit(model, monitor, [logger])
        run_dir = Path(logger.experiment.dir).parent
    finally:
        wandb.finish()
    run = read_run(run_dir)

    # health/* is plotted against the trainer's step
    assert any(m.glob_name == "health/*" and m.step_metric == "trainer/global_step" for m in run["metrics"])
    rows = run["history"]
    stds = [(r["trainer/global_step"], r["health/act_std/net.1"]) for r in rows if "health/act_std/net.1" in r]
    assert [s for s, _ in stds] == [0, 2, 4, 6, 8]
    np.testing.assert_allclose([v for _, v in stds], [v for _, v in monitor.curves("act_std")["net.1"]])

    # Histograms from the device-binned counts: B bins plus one open-end bin each side, same sample as TB
    hists = {r["trainer/global_step"]: r for r in rows if r.get("health/activations/net.1/_type") == "histogram"}
    assert sorted(hists) == [0, 2, 4, 6, 8]
    for step, row in hists.items():
        bins, values = np.array(row["health/activations/net.1/bins"]), row["health/activations/net.1/values"]
        assert len(bins) == len(values) + 1 == 64 + 3
        assert values == _expected_counts(model.acts[step], bins[1:-1])

    # The heatmap image and the findings table
    images = [r for r in rows if r.get("health/dead_fraction_heatmap/_type") == "image-file"]
    steps = [r["trainer/global_step"] for r in images]  # mid-run re-renders wait for the picture budget
    assert steps[0] == 2 and steps[-1] == 10 and set(steps) <= {2, 6, 10}
    tables = [r for r in rows if r.get("health/findings/_type") == "table-file"]
    table = json.loads((run_dir / "files" / tables[-1]["health/findings/path"]).read_text())
    assert table["columns"][:4] == ["since_step", "layer", "kind", "severity"]
    assert [row[:4] for row in table["data"]] == [[2, "net.1", "dead", "critical"]]

    # Config: the monitor's settings and layers; summary: the verdict to filter runs by
    config = run["config"]["lightning_health"]
    assert config["layers"] == ["net.1"] and config["every_n_steps"] == 2 and config["dead_window"] == 2
    summary = run["summary"]
    assert summary["health/final_dead_fraction/net.1"] == pytest.approx(10 / 16)
    assert summary["health/worst_layer"] == "net.1" and summary["health/status"] == 2
    assert summary["health/verdict"] == "critical" and summary["health/nonfinite_layers"] == 0
    assert summary["health/n_critical_findings"] == 1


# -- other loggers, and no logger ---------------------------------------------------------------------------
class MetricsOnly(Logger):
    """A logger that takes nothing but scalars (like many third-party loggers)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    name = "metrics-only"
    version = "0"

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def test_csv_and_scalar_only_loggers_get_scalars_and_nothing_fails(tmp_path):
    csv_logger, plain = CSVLogger(tmp_path, name="csv"), MetricsOnly()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a sink that failed would warn
        warnings.filterwarnings("ignore", "critical health finding", RuntimeWarning)
        _fit(Probe(), _monitor(), [csv_logger, plain], epochs=1)
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["step"]) for r in rows if r.get("health/dead_fraction/net.1")) == [2, 4]
    assert [s for s, m in plain.rows if "health/act_std/net.1" in m] == [0, 2, 4]


def test_no_logger_still_diagnoses(capsys):
    monitor = _monitor(verbose=True)
    _fit(Probe(), monitor, loggers=False, epochs=1)
    assert [f.kind for f in monitor.diagnose()] == ["dead"]
    assert "net.1" in capsys.readouterr().out


# -- pure parts ----------------------------------------------------------------------------------------------
def test_raw_histogram_args_never_carry_nan_and_keep_the_open_ends():
    hist = Histogram(edges=(0.0, 1.0, 2.0), counts=(3.0, 1.0, 0.0, 2.0, 5.0))  # below, 2 bins, above, nonfinite
    args = raw_histogram_args(hist)
    assert args["bucket_limits"] == [0.0, 1.0, 2.0, 3.0] and args["bucket_counts"] == [3.0, 1.0, 0.0, 2.0]
    assert args["num"] == 6 and args["min"] == -1.0 and args["max"] == 3.0
    assert all(math.isfinite(v) for v in (args["sum"], args["sum_squares"], args["min"], args["max"]))


def test_panel_layout_follows_the_logger_prefix():
    (regex,) = panel_layout("exp-")["health: all layers per metric"]["dead fraction"][1]
    assert re.search(regex, "exp-health/dead_fraction/net.1")
    assert not re.search(regex, "health/dead_fraction/net.1") and not re.search(regex, "exp-health/val_dead_fraction/a")


def test_heatmap_grid_keeps_the_worst_reading_per_column_and_greys_missing():
    names, steps, grid = heatmap_grid({"b": [(0, 0.1), (1, 0.9), (2, 0.2)], "a": [(2, 0.5)]}, ["a", "b"], max_columns=2)
    assert names == ["a", "b"] and steps == [0, 2]
    np.testing.assert_array_equal(np.isnan(grid), [[True, False], [False, False]])
    assert grid[1].tolist() == [0.9, 0.2]
    img = render_heatmap({"b": [(0, 0.0), (1, 1.0)]})
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


def test_findings_markdown_and_summary():
    f = Finding("enc|1", "dead", "critical", "70% of units | dead", 4, "hint")
    text = findings_markdown(9, [f])
    assert "enc\\|1" in text and "70% of units \\| dead" in text and "1 critical" in text
    s = run_summary({"a": [(1, 0.1)], "b": [(1, 0.7)]}, [f], ["a", "b"])
    assert s["health/worst_layer"] == "b" and s["health/status"] == "critical" and s["health/n_findings"] == 1


def test_sink_set_sends_findings_only_on_change_and_drops_a_failing_sink():
    class Recorder(SinkBase):
        def __init__(self) -> None:
            self.calls: list[int] = []

        def findings(self, step: int, findings: Any) -> None:
            self.calls.append(step)

    class Broken(SinkBase):
        def write(self, step: int, scalars: Any, histograms: Any) -> None:
            raise OSError("disk full")

    rec = Recorder()
    sinks = SinkSet([Broken(), rec])
    f = Finding("a", "dead", "warning", "m", 1, "h")
    for step, found in [(0, []), (1, [f]), (2, [f]), (3, [f.__class__(**{**f.__dict__, "severity": "critical"})])]:
        sinks.findings(step, found)
    assert rec.calls == [0, 1, 3]
    with pytest.warns(RuntimeWarning, match="Broken"):
        sinks.write(0, {"x": 1.0}, {})
    assert sinks.sinks == [rec]


def _records(path: Path) -> list[tuple[bytes, int, bytes, int]]:
    """Every TFRecord of an event file: ``(length header, its checksum, data, its checksum)`` as stored."""
    import struct

    raw, out, at = path.read_bytes(), [], 0
    while at < len(raw):
        header = raw[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", raw[at + 8 : at + 12])
        data = raw[at + 12 : at + 12 + length]
        (data_crc,) = struct.unpack("<I", raw[at + 12 + length : at + 16 + length])
        out.append((header, header_crc, data, data_crc))
        at += 16 + length
    return out


def test_c_checksums_equal_tensorboards_pure_python_ones():
    """The swapped-in checksum is TensorBoard's masked CRC-32C, byte string by byte string."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as python_crc

    from lightning_health.sinks import record_checksum

    assert record_checksum._C_VALUE is not None, "google-crc32c's C implementation comes with the tensorboard extra"
    rng = np.random.default_rng(0)
    for n in (0, 1, 3, 8, 255, 1024, 14_001):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert record_checksum.masked_crc32c(data) == python_crc(data)


def test_a_monitored_run_writes_event_records_whose_checksums_hold(tmp_path):
    """With the monitor's TensorBoard sink the writer checksums in C (a sampled step's event no longer
    holds the GIL for milliseconds in the writer thread), and every record of the real event file
    still carries TensorBoard's own checksums: a reader that verifies them reads it all back."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as python_crc
    from tensorboard.summary.writer import record_writer

    from lightning_health.sinks import record_checksum

    _fit(Probe(), HealthMonitor(every_n_steps=1, verbose=False), TensorBoardLogger(str(tmp_path)), epochs=1)
    assert record_writer.masked_crc32c is record_checksum.masked_crc32c
    (events,) = list(tmp_path.rglob("events.out.tfevents.*"))
    records = _records(events)
    assert len(records) > 10
    for header, header_crc, data, data_crc in records:
        assert (header_crc, data_crc) == (python_crc(header), python_crc(data))
    assert read_tb_scalars(tmp_path)  # and TensorBoard's own reader takes the file
