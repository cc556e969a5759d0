"""A real TensorBoard server on 127.0.0.1, started as a subprocess and always stopped.

Used by the server test (``tests/test_tensorboard_server.py``) and the screenshot script
(``scripts/screenshots.py``). The server is TensorBoard's own (``python -m tensorboard.main``), on a
port the operating system picks (``--port 0``), read back from the line it prints when it is ready.
Every wait is bounded; a server that does not come up raises with the end of its log.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

_READY = re.compile(r"http://127\.0\.0\.1:(\d+)/")


class TensorBoardServer:
    """A running server: ``get_json`` and ``get_bytes`` read its HTTP data API."""

    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log

    def get_bytes(self, route: str, timeout: float = 10.0, **params: Any) -> bytes:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{route.lstrip('/')}{query}", timeout=timeout) as response:
            return bytes(response.read())

    def get_json(self, route: str, **params: Any) -> Any:
        return json.loads(self.get_bytes(route, **params))

    def wait_for(self, ready: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        """Poll ``ready`` (every 0.2 s, at most ``timeout`` s) until it holds; raise saying ``what`` never came."""
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"TensorBoard at {self.url} never served {what}; log:\n{_tail(self.log)}")
            time.sleep(0.2)


def serves_in_full(server: TensorBoardServer, runs: Sequence[str], last_step: int) -> bool:
    """Whether the server has read every run's health status up to ``last_step - 1``, its heatmap at
    ``last_step`` (the one drawn at the end of training) and its findings text."""
    status_tag, heatmap_tag, text_tag = "health/status", "health/dead_fraction_heatmap", "health/findings/text_summary"
    images, texts = server.get_json("data/plugin/images/tags"), server.get_json("data/plugin/text/tags")
    if not all(heatmap_tag in images.get(run, {}) and text_tag in texts.get(run, []) for run in runs):
        return False
    for run in runs:
        status = server.get_json("data/plugin/scalars/scalars", run=run, tag=status_tag)
        heatmaps = server.get_json("data/plugin/images/images", run=run, tag=heatmap_tag)
        if not status or not heatmaps or status[-1][1] < last_step - 1 or heatmaps[-1]["step"] < last_step:
            return False
    return True


def _tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


@contextlib.contextmanager
def tensorboard_server(
    logdir: str | Path, work_dir: str | Path, extra_args: Sequence[str] = (), timeout: float = 30.0
) -> Iterator[TensorBoardServer]:
    """Serve ``logdir`` on 127.0.0.1 at a free port for the ``with`` block, then stop the server.

    Args:
        logdir: The TensorBoard log directory.
        work_dir: Where the server's log goes (``tensorboard.log``).
        extra_args: More flags, e.g. ``[lightning_health.offline.demo.EVERY_STEP_FLAG]``.
        timeout: Seconds to wait for the server to print its address.
    """
    log = Path(work_dir) / "tensorboard.log"
    command = [
        sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", "0",
        "--load_fast", "false", "--reload_interval", "1", *extra_args,
    ]  # fmt: skip
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield TensorBoardServer(_wait_for_address(process, log, timeout), process, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_for_address(process: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _READY.search(log.read_text(errors="replace"))
        if found:
            return f"http://127.0.0.1:{found.group(1)}/"
        if process.poll() is not None:
            raise RuntimeError(f"TensorBoard exited with {process.returncode}; log:\n{_tail(log)}")
        time.sleep(0.1)
    raise TimeoutError(f"TensorBoard printed no address within {timeout:.0f} s; log:\n{_tail(log)}")
