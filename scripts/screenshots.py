"""Regenerate the TensorBoard screenshots in docs/img/ from a fresh run of ``lightning-health demo``.

Runs the demo (healthy, dying, exploding) into a temporary folder, serves it with TensorBoard's own
server on 127.0.0.1 (a free port, every step kept), opens each view in headless Chromium and saves
the page as a PNG:

    python scripts/screenshots.py                 # the full demo (30 epochs, 150 steps a run) -> docs/img/
    python scripts/screenshots.py --epochs 2 --out /tmp/shots --only tb_panel

Needs the ``chromium`` system package (Debian: ``apt-get install chromium``), or a browser named by
``--chromium``. TensorBoard's pages are a JavaScript application: Chromium is given a virtual-time
budget so the charts are drawn before the picture is taken.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package and tests/tb_server.py from this checkout

from lightning_health.cli import main as cli_main  # noqa: E402
from lightning_health.offline.demo import EVERY_STEP_FLAG, PATIENTS  # noqa: E402
from tests.tb_server import TensorBoardServer, serves_in_full, tensorboard_server  # noqa: E402

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
)  # fmt: skip


@dataclass(frozen=True)
class View:
    """One screenshot: a TensorBoard page (the part after the server's address), the window, what to keep.

    ``rows`` keeps only that band of the page (top, bottom, in pixels); ``legend`` then pastes the
    sidebar's run list (which run has which colour) at that point of the band, where the page is empty.
    """

    name: str
    page: str
    width: int = 1400
    height: int = 1000
    rows: tuple[int, int] | None = None
    legend: tuple[int, int] | None = None


RUN_LIST = (0, 405, 340, 588)  # the sidebar's "Runs" block (left, top, right, bottom) at 1400 px wide
# Legacy dashboards keep settings in the URL hash: no smoothing, so a status step from 0 to 2 stays a step.
VIEWS = (
    View("tb_panel", "#custom_scalars&_smoothingWeight=0"),
    View("tb_panel_layers", "#custom_scalars&_smoothingWeight=0", height=1800, rows=(1070, 1745), legend=(0, 40)),
    View("tb_status", "#scalars&_smoothingWeight=0&tagFilter=health%2Fstatus", 1400, 660, (0, 470), (760, 190)),
    View("tb_heatmap", "#images&tagFilter=dead_fraction_heatmap", height=1100, rows=(0, 665)),
    View("tb_findings", "#text&tagFilter=findings", height=1100),
)
HEATMAP_TAG = "health/dead_fraction_heatmap"


def find_chromium(explicit: str | None = None) -> str | None:
    """The Chromium executable: ``explicit``, else ``chromium`` / ``chromium-browser`` / ``google-chrome`` on PATH."""
    if explicit:
        return shutil.which(explicit) or (explicit if Path(explicit).is_file() else None)
    return next(
        (found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))), None
    )


def screenshot(chromium: str, url: str, target: Path, width: int, height: int, budget_ms: int = 15000) -> None:
    """One page to ``target`` (PNG), in a fresh browser profile; raises with Chromium's last words on failure."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [
            chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
            f"--virtual-time-budget={budget_ms}", f"--screenshot={target}", url,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    if done.returncode != 0 or not target.is_file():
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"chromium could not take {target.name} (exit {done.returncode}): {' | '.join(tail)}")


def run_demo(out_dir: Path, epochs: int) -> int:
    """``lightning-health demo`` into ``out_dir`` (its printout kept out of the way); the steps of each run."""
    printout = io.StringIO()
    with contextlib.redirect_stdout(printout), contextlib.redirect_stderr(io.StringIO()):
        code = cli_main(["demo", "--out", str(out_dir), "--epochs", str(epochs), "--no-progress"])
    if code != 0:
        raise RuntimeError(f"lightning-health demo exited with {code}")
    return epochs * 5  # 80 samples, batches of 16


def _keep_rows(path: Path, view: View) -> None:
    from PIL import Image

    if view.rows is None:
        return
    with Image.open(path) as page:
        band = page.crop((0, view.rows[0], page.width, view.rows[1]))
        if view.legend is not None:
            band.paste(page.crop(RUN_LIST), view.legend)
    band.save(path, optimize=True)


def take(server: TensorBoardServer, chromium: str, views: Sequence[View], out_dir: Path) -> list[Path]:
    """Every view of ``views`` from the running ``server`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for view in views:
        target = out_dir / f"{view.name}.png"
        screenshot(chromium, server.url + view.page, target, view.width, view.height)
        _keep_rows(target, view)
        written.append(target)
    return written


def save_heatmaps(server: TensorBoardServer, runs: Sequence[str], out_dir: Path) -> list[Path]:
    """Each run's last heatmap, the PNG exactly as TensorBoard serves it (W&B gets the same picture)."""
    written = []
    for run in runs:
        (*_, last) = server.get_json("data/plugin/images/images", run=run, tag=HEATMAP_TAG)
        target = out_dir / f"heatmap_{run}.png"
        target.write_bytes(server.get_bytes("data/plugin/images/individualImage?" + last["query"]))
        written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go (docs/img)")
    parser.add_argument("--epochs", type=int, default=30, help="demo epochs per patient (the demo's default: 30)")
    parser.add_argument("--only", nargs="*", choices=[view.name for view in VIEWS], help="take only these views")
    parser.add_argument("--chromium", help="the browser executable (default: chromium on PATH)")
    args = parser.parse_args(argv)
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("screenshots: no Chromium found; apt-get install chromium, or pass --chromium PATH", file=sys.stderr)
        return 2
    views = [view for view in VIEWS if not args.only or view.name in args.only]
    with tempfile.TemporaryDirectory(prefix="lightning-health-shots-") as tmp:
        runs = Path(tmp) / "runs"
        last_step = run_demo(runs, args.epochs)
        with tensorboard_server(runs, tmp, extra_args=[EVERY_STEP_FLAG]) as server:
            names = [patient.name for patient in PATIENTS]
            server.wait_for(lambda: serves_in_full(server, names, last_step), "the demo's runs in full", timeout=60)
            shots = take(server, chromium, views, args.out)
            for path in shots + (save_heatmaps(server, names, args.out) if not args.only else []):
                print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
