"""The dashboards as a user sees them: TensorBoard's own server over the demo's three runs, read through its HTTP API.

The demo (healthy, dying, exploding) is trained for 2 epochs (10 steps each), enough for the dying
run to lose its units and the exploding one to go NaN. A real ``tensorboard`` process serves the log
directory on 127.0.0.1 at a free port; the tests read what its Custom Scalars, Scalars, Images and
Text tabs would show, from the same routes the web page calls. No browser is needed.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")

from lightning_health.offline.demo import EVERY_STEP_FLAG, PATIENTS, train_patient
from lightning_health.sinks.status import STATUS_TAG
from tests.tb_server import TensorBoardServer, serves_in_full, tensorboard_server

HEATMAP = "health/dead_fraction_heatmap"
FINDINGS = "health/findings/text_summary"  # add_text's tag for "health/findings"
EPOCHS = 2  # 5 steps an epoch: the dying run's units are dead and the exploding run is NaN by step 10


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The demo's three runs and the number of optimizer steps each took."""
    out = tmp_path_factory.mktemp("demo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the sick runs' critical findings warn, as they should
        steps = {train_patient(patient, out, epochs=EPOCHS, progress=False).steps for patient in PATIENTS}
    (last,) = steps
    return out, last


@pytest.fixture(scope="module")
def server(demo_dir: tuple[Path, int], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TensorBoardServer]:
    logdir, last_step = demo_dir
    # the flag the demo tells users to start TensorBoard with: every step must be served
    with tensorboard_server(logdir, tmp_path_factory.mktemp("tb"), extra_args=[EVERY_STEP_FLAG]) as running:
        runs = [patient.name for patient in PATIENTS]
        running.wait_for(lambda: serves_in_full(running, runs, last_step), "the demo's three runs in full")
        yield running


def test_server_lists_the_three_patients_and_the_health_tabs(server: TensorBoardServer) -> None:
    assert sorted(server.get_json("data/runs")) == ["dying", "exploding", "healthy"]
    plugins = server.get_json("data/plugins_listing")
    for plugin in ("custom_scalars", "scalars", "images", "text", "histograms"):
        assert plugins[plugin]["enabled"], plugin


def test_custom_scalars_layout_puts_status_first_and_names_each_layer(server: TensorBoardServer) -> None:
    layout = server.get_json("data/plugin/custom_scalars/layout")
    titles = [category["title"] for category in layout["category"]]
    assert titles[:3] == ["health: status", "health: dead fraction per layer", "health: gradient std per layer"]
    status = layout["category"][0]["chart"][0]
    assert status["title"].startswith("status") and status["multiline"]["tag"] == [f"^{STATUS_TAG}$"]
    per_layer = [chart["title"] for chart in layout["category"][1]["chart"]]
    assert per_layer == ["1. net.1", "2. net.3", "3. net.5", "4. net.7"]
    # each chart's regex picks exactly its layer's tag out of what the server holds
    tags = server.get_json("data/plugin/scalars/tags")["dying"]
    for chart in layout["category"][1]["chart"]:
        (regex,) = chart["multiline"]["tag"]
        layer = chart["title"].split(". ", 1)[1]
        assert [tag for tag in tags if re.search(regex, tag)] == [f"health/dead_fraction/{layer}"]


def test_status_scalars_end_healthy_0_and_sick_2(server: TensorBoardServer, demo_dir: tuple[Path, int]) -> None:
    _, last_step = demo_dir
    status = {
        run: server.get_json("data/plugin/scalars/scalars", run=run, tag=STATUS_TAG)
        for run in ("healthy", "dying", "exploding")
    }
    for run, points in status.items():  # [wall_time, step, value]: every sampled step is served
        assert [step for _, step, _ in points] == list(range(last_step)), run
    assert {run: points[-1][2] for run, points in status.items()} == {"healthy": 0.0, "dying": 2.0, "exploding": 2.0}
    assert max(value for _, _, value in status["healthy"]) == 0.0  # never flagged
    nonfinite = server.get_json("data/plugin/scalars/scalars", run="exploding", tag="health/worst/nonfinite_layers")
    assert nonfinite[-1][2] == 4  # all four ReLU layers NaN/Inf
    dead = server.get_json("data/plugin/scalars/scalars", run="dying", tag="health/worst/dead_fraction")
    assert dead[-1][2] > 0.5


def _heatmap(server: TensorBoardServer, run: str) -> tuple[bytes, np.ndarray]:
    from PIL import Image

    (*_, last) = server.get_json("data/plugin/images/images", run=run, tag=HEATMAP)
    png = server.get_bytes("data/plugin/images/individualImage?" + last["query"])
    return png, np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _share(image: np.ndarray, colour: tuple[int, int, int], tolerance: int = 12) -> float:
    return float((np.abs(image.astype(int) - colour) <= tolerance).all(axis=-1).mean())


def test_heatmap_is_a_readable_png_that_tells_the_runs_apart(server: TensorBoardServer) -> None:
    images = {run: _heatmap(server, run) for run in ("healthy", "dying", "exploding")}
    for run, (png, rgb) in images.items():
        assert png[:8] == b"\x89PNG\r\n\x1a\n", run
        assert rgb.shape[1] >= 800 and rgb.shape[0] >= 200, (run, rgb.shape)  # a figure, not a thumbnail
    blue, pale_yellow = (30, 144, 255), (252, 255, 164)  # NaN/Inf cells; inferno at 1.0 (all dead)
    assert _share(images["exploding"][1], blue) > 0.2  # measured 0.40: NaN from step 3 of 10, every layer
    assert _share(images["healthy"][1], blue) == 0 and _share(images["dying"][1], blue) == 0
    assert _share(images["dying"][1], pale_yellow) > 0.02  # measured 0.045: the dead cells of 10 steps
    assert _share(images["healthy"][1], pale_yellow) < 0.001  # the colour bar's top only


def test_findings_text_says_what_is_wrong_with_each_run(server: TensorBoardServer, demo_dir: tuple[Path, int]) -> None:
    _, last_step = demo_dir
    runs = ("healthy", "dying", "exploding")
    text = {run: server.get_json("data/plugin/text/text", run=run, tag=FINDINGS) for run in runs}
    for run, entries in text.items():  # the diagnosis "as of" the last step is written at the end of training
        assert entries[-1]["step"] == last_step, run
    assert f"<strong>No problems found</strong> as of step {last_step}" in text["healthy"][-1]["text"]
    dying, exploding = text["dying"][-1]["text"], text["exploding"][-1]["text"]
    assert "<table>" in dying  # the Markdown table, rendered by the server
    assert "dead" in dying and "NaN/Inf" not in dying
    assert "NaN/Inf" in exploding and "critical" in exploding
