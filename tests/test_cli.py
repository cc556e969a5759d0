"""The ``lightning-health report`` command on real TensorBoard event files written with the tag contract."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")

from torch.utils.tensorboard import SummaryWriter

from lightning_health.cli import main
from lightning_health.offline.event_reader import read_runs, split_health_tag
from lightning_health.sinks.panel import panel_png, panel_rgb

LAYERS = ("net.1", "net.3", "blocks.0.mlp.act")
STEPS = range(0, 100, 10)


def _write_run(run_dir: Path, *, sick: bool, findings: str | None = None) -> None:
    """A run as the core logs it: every reading at each sampled step, dead fraction once the window is full."""
    writer = SummaryWriter(str(run_dir))
    for step in STEPS:
        for index, layer in enumerate(LAYERS):
            dying = sick and step >= 20 + 20 * index
            exploded = sick and step >= 80
            readings = {
                "act_mean": math.nan if exploded else 0.5 + index,
                "act_std": 1.0,
                "grad_std": 50.0 if sick and step >= 50 else 3e-4,  # sick: grows 1.7e5x its early baseline
                "grad_max": 400.0 if sick else 5e-3,
                "saturation": 0.6 if sick else 0.02,
                "nonfinite": 1.0 if exploded else 0.0,
            }
            if step >= 30:  # the rolling window needs several sampled batches first
                readings["dead_fraction"] = 1.0 if dying else 0.05
            for metric, value in readings.items():
                writer.add_scalar(f"health/{metric}/{layer}", value, step)
        writer.add_scalar("train_loss", 1.0, step)
    if findings is not None:
        writer.add_text("health/findings", findings, STEPS[-1])
    writer.close()


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    _write_run(root / "healthy" / "version_0", sick=False)
    _write_run(root / "sick" / "version_0", sick=True, findings="net.1: 100% dead units since step 30")
    return root


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("health/dead_fraction/net.1", ("dead_fraction", "net.1")),
        ("health/act_mean/encoder.layers.0.mlp.act", ("act_mean", "encoder.layers.0.mlp.act")),
        ("health/grad_std/odd/name", ("grad_std", "odd/name")),
        ("train-health/saturation/net.3", ("saturation", "net.3")),
        ("health/findings", None),
        ("train_loss", None),
    ],
)
def test_split_health_tag(tag: str, expected: tuple[str, str] | None) -> None:
    assert split_health_tag(tag) == expected


def test_read_runs_recovers_curves_and_findings(runs_dir: Path) -> None:
    runs = {run.name: run for run in read_runs(runs_dir)}
    assert set(runs) == {"healthy/version_0", "sick/version_0"}
    sick = runs["sick/version_0"]
    assert sick.layers == list(LAYERS)  # first-written order, i.e. the model's order
    assert [step for step, _ in sick.curves["act_std"]["net.1"]] == list(STEPS)
    assert sick.curves["dead_fraction"]["net.3"][0] == (30, pytest.approx(0.05))  # stored as float32
    assert sick.curves["dead_fraction"]["net.3"][-1] == (90, 1.0)
    assert "train_loss" not in sick.curves
    assert sick.findings_text == [(90, "net.1: 100% dead units since step 30")]
    assert runs["healthy/version_0"].findings_text == []
    # the run directory itself is a run too
    (only,) = read_runs(runs_dir / "sick" / "version_0")
    assert only.name == "version_0"
    assert only.curves["dead_fraction"] == sick.curves["dead_fraction"]  # (act_mean holds NaN, never equal)


def test_report_prints_table_findings_and_comparison(runs_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(runs_dir)]) == 0
    out = capsys.readouterr().out
    assert "=== sick/version_0 | step 90 | per-layer health ===" in out
    header = next(line for line in out.splitlines() if line.startswith("layer "))
    for heading in ("act mean", "act std", "grad std", "max grad", "dead", "sat"):
        assert heading in header
    healthy_part, sick_part = out.split("=== sick/version_0")
    assert "No findings" in healthy_part
    net1 = next(line for line in sick_part.splitlines() if line.startswith("!! net.1 "))  # NaN layers lead
    assert [cell.strip() for cell in net1.split("|")][1:] == [
        "nan",
        "1",
        "5.00e+01",
        "4.00e+02",
        "nan",
        "60%",
    ]  # a NaN layer is broken, not dead
    # findings come from the core's diagnosis replayed over the read-back curves, with hints
    assert (  # past exploding_growth**2 at step 50 at once; the latest state (step 90) is a sustained one
        "[critical] net.1: gradient std 5.00e+01, 1.67e+05x its usual level (3.00e-04) for two sampled steps "
        "(since step 50;" in sick_part
    )
    assert "[critical] net.1: 100% of units dead" in sick_part and "(since step 30)" in sick_part
    assert "hint: " in sick_part
    assert "from step 80: values turned NaN/Inf in net.1, net.3, blocks.0.mlp.act" in sick_part
    assert "NaN/Inf first seen at step 80" in sick_part
    comparison = out.split("=== comparison")[1]
    rows = {line.split()[0]: line for line in comparison.splitlines()[3:]}
    # a layer gone NaN is not "alive": the comparison says when it died and when it broke
    assert rows["net.1"].endswith("died at step 30, NaN/Inf from step 80")
    assert "died at step 40, NaN/Inf from step 80" in rows["net.3"]
    assert "died at step 60, NaN/Inf from step 80" in rows["blocks.0.mlp.act"]
    assert rows["net.1"].count("alive (peak 5% dead)") == 1


def test_report_json(runs_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(runs_dir / "healthy"), str(runs_dir / "sick"), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)  # strict JSON: NaN is spelled as a string
    assert payload["dead_threshold"] == 0.2
    healthy, sick = payload["runs"]
    assert healthy["death_onsets"] == {layer: None for layer in LAYERS}
    assert healthy["findings"] == []
    assert sick["death_onsets"] == {"net.1": 30, "net.3": 40, "blocks.0.mlp.act": 60}
    assert sick["first_nonfinite_step"] == 80
    assert sick["latest"]["net.1"]["act_mean"] == "NaN"
    assert sick["latest"]["net.1"]["dead_fraction"] == 1.0
    kinds = {(f["layer"], f["kind"]): f for f in sick["findings"]}
    assert kinds[("net.1", "dead")]["step"] == 30 and kinds[("net.1", "dead")]["severity"] == "critical"
    assert kinds[("net.3", "nonfinite")]["step"] == 80
    assert ("net.1", "exploding_gradient") in kinds
    assert sick["logged_findings"] == [{"step": 90, "text": "net.1: 100% dead units since step 30"}]


def _colour_pixels(image: np.ndarray, colour: tuple[float, ...], tolerance: float = 0.06) -> int:
    return int((np.abs(image[..., :3] - np.asarray(colour[:3])) < tolerance).all(axis=-1).sum())


def test_report_png_draws_one_panel_per_run(runs_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import matplotlib.image
    from matplotlib import colormaps

    target = tmp_path / "out" / "panel.png"
    assert main(["report", str(runs_dir), "--png", str(target), "--per-run"]) == 0
    out = capsys.readouterr().out
    files = sorted(p.name for p in target.parent.iterdir())
    assert files == ["panel-healthy_version_0.png", "panel-sick_version_0.png", "panel.png"]
    assert f"all runs side by side: {target}" in out
    comparison = matplotlib.image.imread(target)
    assert comparison.shape[0] > 600  # the status row plus one row per run
    # the sick run's dead-fraction chart spans its steps and shades where it went NaN/Inf (step 80 on)
    assert _colour_pixels(comparison, (0.868, 0.935, 1.0), tolerance=0.02) > 1000
    assert f"panel: {target.parent / 'panel-sick_version_0.png'}" in out

    image = matplotlib.image.imread(target.parent / "panel-sick_version_0.png")
    height, width = image.shape[:2]
    assert width >= 800 and height >= 300
    assert image[..., :3].std() > 0.1  # not blank
    left = image[:, : width // 2]  # the curves; the heatmap is on the right
    for index in range(len(LAYERS)):  # one distinct tab10 colour per layer's curve
        assert _colour_pixels(left, colours := colormaps["tab10"](index)) > 50, (index, colours)
    assert _colour_pixels(left, colormaps["tab10"](len(LAYERS))) == 0  # and no fourth curve
    right = image[:, width // 2 :]
    assert _colour_pixels(right, colormaps["magma"](1.0)) > 1000  # dead cells of the heatmap
    assert _colour_pixels(right, colormaps["magma"](0.05), tolerance=0.04) > 1000  # living cells


def test_single_run_png_uses_the_given_name(runs_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "sick.png"
    assert main(["report", str(runs_dir / "sick"), "--png", str(target)]) == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_panel_rgb_and_png_for_dashboards() -> None:
    curves = {"net.1": [(0, 0.0), (10, 0.5), (20, 1.0)], "net.3": [(0, 0.0), (20, 0.1)]}
    rgb = panel_rgb(curves, title="t")
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.std() > 10
    assert panel_png(curves).startswith(b"\x89PNG")


def test_empty_directory_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"lightning-health: no TensorBoard event files under {tmp_path}\n"


def test_missing_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert main(["report", str(missing)]) == 2
    assert capsys.readouterr().err == f"lightning-health: {missing} does not exist\n"


def test_event_files_without_health_readings_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    writer = SummaryWriter(str(tmp_path / "plain"))
    writer.add_scalar("train_loss", 1.0, 0)
    writer.close()
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no health readings" in err and "HealthMonitor" in err


def test_good_and_empty_paths_report_the_good_and_exit_2(
    runs_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(runs_dir / "sick"), str(empty)]) == 2
    captured = capsys.readouterr()
    assert "=== version_0" in captured.out
    assert "no TensorBoard event files" in captured.err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "report" in capsys.readouterr().out


def test_png_to_an_unwritable_place_is_one_line_and_exit_2(runs_dir: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["report", str(runs_dir), "--png", str(blocker / "x.png")]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and f"cannot write --png {blocker / 'x.png'}" in captured.err
    assert "=== sick/version_0" in captured.out and "=== comparison" in captured.out  # the report still printed
    assert "all runs side by side" not in captured.out


def test_png_into_a_read_only_folder_is_one_line_and_exit_2(runs_dir: Path, tmp_path: Path, capsys) -> None:
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root): a read-only folder cannot be made")
        assert main(["report", str(runs_dir / "sick"), "--png", str(locked / "panel.png")]) == 2
    finally:
        locked.chmod(0o700)
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and str(locked / "panel.png") in captured.err
    assert "=== version_0" in captured.out


def test_truncated_event_file_warns_with_what_was_read(runs_dir: Path, capsys) -> None:
    (events,) = (runs_dir / "sick" / "version_0").glob("*tfevents*")
    data = events.read_bytes()
    events.write_bytes(data[: len(data) - 7])
    assert main(["report", str(runs_dir / "sick")]) == 0
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1
    assert "warning" in err and "truncated" in err and "whole record(s)" in err and "up to step" in err
    # the printed report says so too, so a report saved to a file is not taken for the whole run
    assert "note: " in captured.out and "truncated" in captured.out and "up to step" in captured.out


def test_negative_zero_prints_as_zero() -> None:
    from lightning_health.sinks.console import HealthReport

    # a dead layer's largest gradient is the max over an all-zero tensor, which can be -0.0
    latest = {"net.1": {"act_mean": -0.0, "act_std": 0.0, "grad_std": 0.0, "grad_max": -0.0, "dead_fraction": 1.0}}
    text = HealthReport.from_latest("dead", 5, latest, []).render_text()
    row = next(line for line in text.splitlines() if line.startswith("net.1"))
    assert "-0" not in row and "0.00e+00" in row
