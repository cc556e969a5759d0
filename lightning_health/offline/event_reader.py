"""Read the health series of finished (or running) runs back from TensorBoard event files.

The core logs every reading as a scalar tagged ``health/<metric>/<layer>`` at the sampled
``global_step``; this module turns those tags back into the same shape that
:meth:`HealthMonitor.curves` returns, one :class:`RunHealth` per run directory, so the command line
(and anything else) can diagnose and draw a run without the model or the training process.

Example:
    >>> from lightning_health.offline.event_reader import split_health_tag
    >>> split_health_tag("health/dead_fraction/encoder.layers.0.act")
    ('dead_fraction', 'encoder.layers.0.act')
    >>> split_health_tag("epoch") is None
    True
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lightning_health._optional import installed
from lightning_health.offline.event_check import damaged_event_files

#: Metric -> layer -> [(step, value)], the shape of ``HealthMonitor.curves`` for every metric at once.
Curves = dict[str, dict[str, list[tuple[int, float]]]]

EVENT_FILE_MARKER = "tfevents"
FINDINGS_TAG = "health/findings"

# An optional Lightning logger prefix (``TensorBoardLogger(prefix="train")`` writes ``train-health/...``)
# followed by ``health/<metric>/<layer>``. Metric names have no slash; layer names are module qualified
# names and are taken verbatim (everything after the second slash).
_SCALAR_TAG = re.compile(r"^(?:[^/]*-)?health/(?P<metric>[^/]+)/(?P<layer>.+)$")
# The run's status line: not per layer (see lightning_health.sinks.status).
_STATUS_TAG = re.compile(r"^(?:[^/]*-)?health/(?P<key>status|worst/[^/]+)$")
# Written at a sampled step whose optimizer step the GradScaler skipped (see lightning_health.monitor.record).
_AMP_SKIPPED_TAG = re.compile(r"^(?:[^/]*-)?health/amp_skipped_step$")


def split_health_tag(tag: str) -> tuple[str, str] | None:
    """Split a scalar tag ``health/<metric>/<layer>`` into ``(metric, layer)``.

    Args:
        tag: A TensorBoard scalar tag.

    Returns:
        ``(metric, layer)``, or ``None`` when the tag is not a per-layer health reading
        (``epoch``, ``train_loss``, the ``health/findings`` text, ...).
    """
    match = _SCALAR_TAG.match(tag)
    if match is None or _STATUS_TAG.match(tag):
        return None
    return match.group("metric"), match.group("layer")


@dataclass
class RunHealth:
    """The health readings of one run, read back from its event files.

    Attributes:
        name: A short name for the run: its directory relative to the path it was found under.
        path: The directory that holds the run's event files.
        curves: ``{metric: {layer: [(step, value), ...]}}`` with steps ascending. Layers are in the
            order they were first written, which is the model's module order for the core's logging.
        findings_text: Every ``health/findings`` text written during the run as ``(step, text)``.
        status: The run's status line, ``{"status": [...], "worst/dead_fraction": [...], ...}`` (the
            ``health/status`` and ``health/worst/*`` scalars, see :mod:`lightning_health.sinks.status`).
        problems: One line per event file that is truncated or corrupt, saying what was read.
        amp_skipped_steps: The sampled steps whose optimizer step the GradScaler skipped
            (``health/amp_skipped_step``): the report judges them as the live monitor did.
    """

    name: str
    path: Path
    curves: Curves = field(default_factory=dict)
    findings_text: list[tuple[int, str]] = field(default_factory=list)
    status: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    amp_skipped_steps: list[int] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        """All monitored layers, in first-written order."""
        seen: dict[str, None] = {}
        for per_layer in self.curves.values():
            for layer in per_layer:
                seen.setdefault(layer, None)
        return list(seen)

    @property
    def metrics(self) -> list[str]:
        """The metric names present in this run."""
        return list(self.curves)

    @property
    def last_step(self) -> int | None:
        """The last step at which any reading was written, or ``None`` for an empty run."""
        steps = [points[-1][0] for per_layer in self.curves.values() for points in per_layer.values() if points]
        return max(steps) if steps else None

    def latest(self, metric: str, layer: str) -> float | None:
        """The last reading of ``metric`` for ``layer``, or ``None`` when it was never written."""
        points = self.curves.get(metric, {}).get(layer)
        return points[-1][1] if points else None

    def has_health_data(self) -> bool:
        """Whether any per-layer reading was found."""
        return any(points for per_layer in self.curves.values() for points in per_layer.values())


def find_run_dirs(path: str | os.PathLike[str]) -> list[Path]:
    """Every directory at or below ``path`` that directly holds TensorBoard event files.

    Args:
        path: A run directory, a directory holding many runs (searched recursively), or one event file.

    Returns:
        The run directories, sorted; empty when there are no event files.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"Expected `path` to be an existing directory or event file, got {str(root)!r}")
    if root.is_file():
        return [root.parent] if EVENT_FILE_MARKER in root.name else []
    dirs = {event_file.parent for event_file in root.rglob(f"*{EVENT_FILE_MARKER}*") if event_file.is_file()}
    return sorted(dirs)


def read_run(run_dir: str | os.PathLike[str], name: str | None = None) -> RunHealth:
    """Read one run directory's health scalars and findings text.

    All event files in the directory are read together (a resumed run writes a second file), and a
    step written twice keeps its last value, as TensorBoard shows it.

    Args:
        run_dir: A directory that holds event files.
        name: The run's display name; defaults to the directory name.

    Returns:
        The run's readings; :meth:`RunHealth.has_health_data` is ``False`` when there were none.

    Raises:
        ModuleNotFoundError: If ``tensorboard`` is not installed.
    """
    if not installed("tensorboard"):
        raise ModuleNotFoundError(
            "Reading event files needs `tensorboard`; install it with `pip install 'lightning_health[tensorboard]'`"
        )
    from tensorboard.backend.event_processing import event_accumulator

    run_path = Path(run_dir)
    accumulator = event_accumulator.EventAccumulator(
        str(run_path),
        size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0},
    )
    accumulator.Reload()
    tags = accumulator.Tags()

    curves: Curves = {}
    status: dict[str, list[tuple[int, float]]] = {}
    skipped: set[int] = set()
    for tag in tags.get(event_accumulator.SCALARS, []):
        if _AMP_SKIPPED_TAG.match(tag):
            skipped.update(event.step for event in accumulator.Scalars(tag) if event.value > 0)
            continue
        status_key = _status_key(tag)
        parsed = split_health_tag(tag)
        if status_key is None and parsed is None:
            continue
        by_step = sorted({event.step: float(event.value) for event in accumulator.Scalars(tag)}.items())
        if status_key is not None:
            status[status_key] = by_step
        elif parsed is not None:
            curves.setdefault(parsed[0], {})[parsed[1]] = by_step

    findings: list[tuple[int, str]] = []
    for tag in tags.get(event_accumulator.TENSORS, []):
        if not _is_findings_tag(tag):
            continue
        for event in accumulator.Tensors(tag):
            text = _decode_text(event.tensor_proto)
            if text is not None:
                findings.append((event.step, text))
    findings.sort(key=lambda item: item[0])
    run = RunHealth(name=name or run_path.name, path=run_path, curves=curves, findings_text=findings, status=status)
    run.amp_skipped_steps = sorted(skipped)
    for check in damaged_event_files(run_path):
        read = f"read {check.records} whole record(s) before it"
        last = run.last_step
        run.problems.append(
            f"{check.path.name} is {check.problem}; {read}"
            + (f", health readings up to step {last}" if last is not None else "")
        )
    return run


def read_path(path: str | os.PathLike[str]) -> list[RunHealth]:
    """Read every run found under one path (see :func:`find_run_dirs`), runs without readings included.

    Run names are the run directory relative to ``path`` (``healthy/version_0``), or the directory's
    own name when ``path`` is the run.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
    """
    root = Path(path)
    return [read_run(run_dir, name=_run_name(root, run_dir)) for run_dir in find_run_dirs(root)]


def read_runs(paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[RunHealth]:
    """Read every run under each path (see :func:`read_path`), with names made unique across paths.

    Args:
        paths: One path or several.

    Returns:
        One :class:`RunHealth` per run directory, in path order then sorted by directory.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    runs = [run for path in paths for run in read_path(path)]
    make_names_unique(runs)
    return runs


def make_names_unique(runs: list[RunHealth]) -> None:
    """Rename runs whose names clash (the same layout under two paths) to their full directory path."""
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = run.path.as_posix()


def _run_name(root: Path, run_dir: Path) -> str:
    base = root.parent if root.is_file() else root
    if run_dir == base:
        return run_dir.resolve().name
    return run_dir.relative_to(base).as_posix()


def _status_key(tag: str) -> str | None:
    """``"status"`` for ``health/status``, ``"worst/<reading>"`` for ``health/worst/<reading>`` (any logger prefix)."""
    match = _STATUS_TAG.match(tag)
    return match.group("key") if match else None


def _is_findings_tag(tag: str) -> bool:
    # ``SummaryWriter.add_text("health/findings", ...)`` stores the tag as ``health/findings/text_summary``.
    return tag == FINDINGS_TAG or tag.startswith(FINDINGS_TAG + "/") or f"-{FINDINGS_TAG}" in tag


def _decode_text(tensor_proto: object) -> str | None:
    from tensorboard.util import tensor_util

    try:
        array = tensor_util.make_ndarray(tensor_proto)
    except (TypeError, ValueError):
        return None
    items = array.reshape(-1).tolist() if array.size else []
    texts = [item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item) for item in items]
    return "\n".join(texts) if texts else None
