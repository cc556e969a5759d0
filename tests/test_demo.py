"""The demo command and the examples, in reduced settings (seconds each)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("tensorboard")

from lightning_health.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_demo_diagnoses_the_sick_patient(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    healthy, sick = text.split(">>> training the sick")
    assert "The healthy run: nothing went wrong." in healthy
    assert "What went wrong in the sick run:" in sick
    # with N(0,1) weights and lr 0.8 the gradients grow ~1e10x their early baseline at step 2, NaN by step 3
    assert "from step 2: gradients exploded in net.1" in sick
    assert "values turned NaN/Inf in net.1, net.3, net.5, net.7" in sick
    assert "units died in" in sick
    assert f"tensorboard --logdir {out}" in text
    assert sorted(p.name for p in out.iterdir()) == ["healthy", "sick"]

    # the runs it wrote read back into the same diagnosis
    assert main(["report", str(out)]) == 0
    report = capsys.readouterr().out
    assert "values turned NaN/Inf in net.1, net.3, net.5, net.7" in report


def test_demo_rejects_bad_epochs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "0"])
    assert "expected a positive integer, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_healthy_vs_sick_example(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = _load_example("healthy_vs_sick")
    assert example.main(["--out", str(tmp_path), "--epochs", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "sick patient" in text and "NaN/Inf" in text
    assert (tmp_path / "sick").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_transformer_lm_example(
    logger: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if logger == "wandb":
        pytest.importorskip("wandb")
        monkeypatch.setenv("WANDB_MODE", "offline")
    example = _load_example("transformer_lm")
    argv = ["--logger", logger, "--out", str(tmp_path), "--max-steps", "4", "--every-n-steps", "2"]
    assert (
        example.main([*argv, "--d-model", "16", "--heads", "2", "--layers", "1", "--context", "16", "--no-progress"])
        == 0
    )
    text = capsys.readouterr().out
    assert "final train loss" in text and "finding(s)" in text
    if logger == "tensorboard":
        assert main(["report", str(tmp_path)]) == 0
        assert "blocks.0.mlp.act" in capsys.readouterr().out
    else:
        assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
