"""scripts/screenshots.py end to end: the demo, TensorBoard and headless Chromium give a panel with curves.

Needs the ``chromium`` system package (Debian: ``apt-get install chromium``); skipped without it.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests.conftest import load_script

pytest.importorskip("tensorboard")
pytest.importorskip("PIL")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "screenshots.py"


def _script() -> ModuleType:
    return load_script(SCRIPT, "screenshots_script")


def _pixels(image: np.ndarray, hex_colour: str, tolerance: int = 24) -> int:
    colour = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(image.astype(int) - colour) <= tolerance).all(axis=-1).sum())


@pytest.mark.slow
def test_screenshot_of_the_panel_shows_every_run_s_curve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    script = _script()
    if script.find_chromium() is None:
        pytest.skip("needs Chromium (apt-get install chromium) to take screenshots")
    assert script.main(["--epochs", "1", "--only", "tb_panel", "tb_status", "--out", str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    for name in ("tb_panel", "tb_status"):
        image = np.asarray(Image.open(tmp_path / f"{name}.png").convert("RGB"))
        assert image.shape[1] == 1400 and image.shape[0] >= 400, name
        assert _pixels(image[:60], "#f57c00") > 10000, name  # TensorBoard's orange bar: the page loaded
        charts = image[100:, 360:]  # right of the sidebar: the charts, not the run legend
        # TensorBoard colours runs in order: healthy #ff7043, dying #0077bb, exploding #cc3311
        healthy, dying, exploding = (_pixels(charts, colour) for colour in ("#ff7043", "#0077bb", "#cc3311"))
        assert healthy > 100 and dying + exploding > 200, (name, healthy, dying, exploding)
        if name == "tb_panel":  # five status charts: every run's line shows somewhere
            assert min(healthy, dying, exploding) > 500, (healthy, dying, exploding)
