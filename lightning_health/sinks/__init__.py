"""Where finished numbers go. Sinks receive host floats and counts, never raw tensors.

:func:`sinks_for` picks one sink per Lightning logger, the richest that logger supports:

- ``TensorBoardLogger`` (or a plain ``SummaryWriter`` passed as ``HealthMonitor(writer=...)``):
  scalars, histograms, the diagnosis panel (custom scalars), findings text and the heatmap image;
- ``WandbLogger``: the same, plus the monitor's settings in the run config and the verdict in the
  run summary;
- any other logger (CSV, MLflow, ...): the scalars through its ``log_metrics``.

A sink that fails is disabled with a warning, so a broken logger never stops training.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_health.sinks.base import Histogram, Sink, SinkBase
from lightning_health.sinks.generic import ScalarSink
from lightning_health.sinks.tensorboard import TensorBoardSink, is_tensorboard_logger
from lightning_health.sinks.wandb import WandbSink, is_wandb_logger

if TYPE_CHECKING:
    import numpy as np

    from lightning_health.diagnosis import Finding

__all__ = [
    "Histogram", "ScalarSink", "Sink", "SinkBase", "SinkSet", "TensorBoardSink", "WandbSink", "sinks_for",
    "writer_sink",
]  # fmt: skip


def writer_sink(writer: Any) -> TensorBoardSink:
    """A sink for ``HealthMonitor(writer=...)``: a ``SummaryWriter``, or a log directory to open one in."""
    if isinstance(writer, (str, os.PathLike)):
        from torch.utils.tensorboard import SummaryWriter

        return TensorBoardSink(writer=SummaryWriter(log_dir=os.fspath(writer)), owns_writer=True)
    return TensorBoardSink(writer=writer)


def sinks_for(loggers: Sequence[Any], writer: Any = None) -> list[Sink]:
    """One sink per logger, the richest that logger supports, plus one for a plain ``writer``."""
    out: list[Sink] = []
    for logger in loggers:
        if is_tensorboard_logger(logger):
            out.append(TensorBoardSink(logger))
        elif is_wandb_logger(logger):
            out.append(WandbSink(logger))
        else:
            out.append(ScalarSink(logger))
    if writer is not None:
        try:
            out.append(writer_sink(writer))
        except OSError as err:  # a monitor setting never stops training
            warnings.warn(
                f"HealthMonitor(writer={writer!r}): cannot open a SummaryWriter there ({err}); "
                "no TensorBoard output through `writer` this run, training continues",
                RuntimeWarning,
                stacklevel=3,
            )
    return out


class SinkSet:
    """Fan the run's output out to every sink, isolating failures.

    Findings are passed on only when the diagnosis changed (a finding appeared, cleared, escalated),
    not at every step.
    """

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = list(sinks)
        self._diagnosis: tuple[tuple[Any, ...], ...] | None = None

    @property
    def takes_images(self) -> bool:
        """Whether any sink shows images (so the heatmap is worth rendering)."""
        return any(getattr(sink, "takes_images", False) for sink in self.sinks)

    def _call(self, method: str, *args: Any) -> None:
        for sink in list(self.sinks):
            fn = getattr(sink, method, None)
            if fn is None:  # a user's sink implementing only part of the protocol
                continue
            try:
                fn(*args)
            except Exception as err:  # never let a logger problem stop training
                self.sinks.remove(sink)
                warnings.warn(
                    f"lightning_health stopped writing to {type(sink).__name__} after an error in {method} "
                    f"({type(err).__name__}: {err}); training continues.",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def start(self, settings: Mapping[str, Any], layers: Sequence[str]) -> None:
        self._call("start", settings, layers)

    def write(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, Histogram]) -> None:
        self._call("write", step, scalars, histograms)

    def findings(self, step: int, findings: Sequence[Finding], force: bool = False) -> None:
        """Pass the diagnosis on when it changed, or when ``force`` (the end of training: "as of" the last step)."""
        state = tuple((f.layer, f.kind, f.severity, f.step, f.active) for f in findings)
        if state == self._diagnosis and not force:
            return
        self._diagnosis = state
        self._call("findings", step, list(findings))

    def image(self, step: int, tag: str, rgb: np.ndarray) -> None:
        self._call("image", step, tag, rgb)

    def finish(self, step: int, summary: Mapping[str, Any]) -> None:
        self._call("finish", step, summary)

    def close(self) -> None:
        self._call("close")
