"""Where finished numbers go. Sinks receive host floats and counts, never raw tensors.

:func:`sinks_for` picks one sink per Lightning logger: TensorBoard gets scalars and histograms,
any other logger (CSV, MLflow, W&B until its own sink lands, ...) gets the scalars through its
``log_metrics``. A sink that fails is disabled with a warning, so a broken logger never stops
training.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_health.sinks.base import Histogram, Sink
from lightning_health.sinks.generic import ScalarSink
from lightning_health.sinks.tensorboard import TensorBoardSink, is_tensorboard_logger

__all__ = ["Histogram", "ScalarSink", "Sink", "SinkSet", "TensorBoardSink", "sinks_for"]


def sinks_for(loggers: Sequence[Any]) -> list[Sink]:
    """One sink per logger, the richest that logger supports."""
    out: list[Sink] = []
    for logger in loggers:
        if is_tensorboard_logger(logger):
            out.append(TensorBoardSink(logger))
        else:
            out.append(ScalarSink(logger))
    return out


class SinkSet:
    """Fan one step's output out to every sink, isolating failures."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = list(sinks)

    def write(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, Histogram]) -> None:
        for sink in list(self.sinks):
            try:
                sink.write(step, scalars, histograms)
            except Exception as err:  # never let a logger problem stop training
                self.sinks.remove(sink)
                warnings.warn(
                    f"lightning_health stopped writing to {type(sink).__name__} after an error "
                    f"({type(err).__name__}: {err}); training continues.",
                    RuntimeWarning,
                    stacklevel=2,
                )
