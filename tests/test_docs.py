"""The documentation builds without warnings (``mkdocs build --strict``), API pages included."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSING = [
    name
    for name in ("mkdocs", "material", "mkdocstrings_handlers.python")
    if importlib.util.find_spec(name.split(".")[0]) is None
]


@pytest.mark.skipif(bool(MISSING), reason=f"docs tooling not installed ({', '.join(MISSING)}); pip install '.[dev]'")
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for page in ("index", "readings", "findings", "cli", "api"):
        assert (tmp_path / "site" / page / "index.html").exists() or (tmp_path / "site" / f"{page}.html").exists()
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "read_run" in api and "panel_rgb" in api


def test_ci_runs_the_readme_test_command_verbatim():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    commands = [line.strip() for line in readme.splitlines() if "pytest" in line and line.startswith("python")]
    assert commands, "the README names its test command"
    ci = (root / ".ci" / "run").read_text()
    assert commands[0] in ci.splitlines()
