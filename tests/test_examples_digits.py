"""examples/digits_rescue.py in its quick mode: the damage is real, every strategy reports, the plot is a PNG."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import load_script

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_rescue.py"
# Quick mode: 3 damage epochs at lr 0.5, batch 8. With the fixed seed about 45% of the last hidden layer is
# dead (and 45-80% across seeds 0-5 after 3 epochs), so a third is a safe floor that still proves real damage:
# a healthy run of this network has under 10% dead there.
QUICK_DEAD_FLOOR = 0.30
STRATEGIES = ("do nothing", "lower LR", "LeakyReLU", "re-init dead", "GELU", "LeakyReLU + lower LR", "GELU + lower LR")


def _load_example() -> ModuleType:
    return load_script(EXAMPLE, "example_digits_rescue")


def _rows(table: str) -> dict[str, list[str]]:
    rows = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("| strategy"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def _percent(cell: str) -> float:
    return float(cell.rstrip("%")) / 100


@pytest.mark.slow
def test_digits_rescue_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png, table_path = tmp_path / "plot" / "digits.png", tmp_path / "digits.md"
    assert _load_example().main(["--quick", "--out", str(png), "--table", str(table_path)]) == 0
    printed = capsys.readouterr().out
    table = table_path.read_text(encoding="utf-8")
    assert table.strip() in printed

    rows = _rows(table)
    damaged = next(cells for name, cells in rows.items() if name.startswith("damaged checkpoint"))
    # columns after the name: change, lr, final acc, best acc, dead last, dead mean, NaN/Inf, treatment ms, training s
    assert _percent(damaged[4]) > QUICK_DEAD_FLOOR, f"the damage phase left too few dead units: {damaged}"
    assert damaged[6] == "no", "the damage must be dead units, not NaNs (which would also read as never firing)"
    assert re.search(r"damage phase: after 3 epochs at lr 0.5, \d+% of the last hidden layer is dead", printed)

    assert set(STRATEGIES) <= set(rows), sorted(rows)
    for name in STRATEGIES:
        _change, _lr, final_acc, best_acc, dead_last, dead_mean, nan, treat_ms, train_s = rows[name]
        assert 0.0 <= float(final_acc) <= float(best_acc) <= 1.0
        assert 0.0 <= _percent(dead_last) <= 1.0 and 0.0 <= _percent(dead_mean) <= 1.0
        assert float(treat_ms) >= 0 and float(train_s) > 0
        assert nan == "no" or nan.startswith("from step ")
    assert rows["lower LR"][1] == "0.05" and rows["do nothing"][1] == "0.5"
    assert re.fullmatch(r"recycled \d+ units", rows["re-init dead"][0])
    assert rows["LeakyReLU"][0] == rows["GELU"][0] == rows["GELU + lower LR"][0] == "5 activations swapped"
    # recycling gives every dead unit fresh weights: the layer cannot stay as dead as the damage left it
    assert _percent(rows["re-init dead"][4]) < _percent(damaged[4])
    assert "Best final val accuracy: **" in table

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    height, width = imread(png).shape[:2]
    assert width > 500 and height > 200
