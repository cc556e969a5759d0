"""The demo command and the examples, in reduced settings (seconds each)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import load_script

pytest.importorskip("tensorboard")

from lightning_health.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load_example(name: str) -> ModuleType:
    return load_script(EXAMPLES / f"{name}.py", f"example_{name}")


@pytest.mark.slow
def test_demo_shows_healthy_dying_and_exploding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    assert main(["demo", "--out", str(out), "--epochs", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    healthy, rest = text.split(">>> training the dying")
    dying, exploding = rest.split(">>> training the exploding")
    assert "The healthy run: nothing went wrong." in healthy
    assert "units died in" in dying and "NaN/Inf" not in dying  # dies with every value finite
    # with N(0,1) weights and lr 0.8 the gradients explode at step 1 and the values are NaN by step 3
    assert "from step 2: gradients exploded in net.1" in exploding
    assert "values turned NaN/Inf in net.1, net.3, net.5, net.7" in exploding
    assert f"tensorboard --logdir {out}" in text
    assert sorted(p.name for p in out.iterdir()) == ["dying", "exploding", "healthy"]

    # the runs it wrote read back into the same diagnosis, and the status line tells them apart
    from lightning_health.offline.event_reader import read_runs

    runs = {run.name: run for run in read_runs(out)}
    last = {name: run.status["status"][-1][1] for name, run in runs.items()}
    assert last == {"healthy": 0.0, "dying": 2.0, "exploding": 2.0}
    assert runs["dying"].status["worst/nonfinite_layers"][-1][1] == 0
    assert runs["dying"].status["worst/dead_fraction"][-1][1] > 0.5
    assert runs["exploding"].status["worst/nonfinite_layers"][-1][1] == 4
    assert main(["report", str(out)]) == 0
    report = capsys.readouterr().out
    assert "values turned NaN/Inf in net.1, net.3, net.5, net.7" in report


def test_demo_into_a_read_only_folder_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["demo", "--out", str(blocker / "runs"), "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the demo runs" in err


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


def test_a_second_demo_into_the_same_folder_replaces_its_runs(tmp_path: Path) -> None:
    """Two demos into one folder: each run folder keeps one event file, so no step is drawn twice."""
    from lightning_health.offline.demo import HEALTHY, quiet_training, train_patient

    mine = tmp_path / "healthy" / "notes.txt"  # anything else in the folder is the user's: left alone
    mine.parent.mkdir()
    mine.write_text("keep")
    with quiet_training():
        for _ in range(2):
            train_patient(HEALTHY, tmp_path, epochs=1, progress=False)
    event_files = [f for f in (tmp_path / "healthy").iterdir() if "tfevents" in f.name]
    assert len(event_files) == 1
    assert mine.read_text() == "keep"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "healthy"), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("health/status")]
    assert steps == sorted(set(steps)) == list(range(5))
