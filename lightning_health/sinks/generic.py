"""Scalars for any Lightning logger, through its own ``log_metrics`` with an explicit step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_health.sinks.base import Histogram, SinkBase


class ScalarSink(SinkBase):
    """Writes ``health/<metric>/<layer>`` scalars at the sampled global step; ignores everything else.

    This is what CSV, MLflow, Neptune, Comet and any custom Lightning logger get: nothing here asks a
    logger for more than ``log_metrics``.
    """

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def write(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, Histogram]) -> None:
        if scalars:
            self.logger.log_metrics(dict(scalars), step=step)
