"""The sink interface and the histogram record sinks receive."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from lightning_health.diagnosis import Finding


@dataclasses.dataclass(frozen=True)
class Histogram:
    """Counts binned on the device against edges fixed before the run.

    Attributes:
        edges: ``B + 1`` bin edges, increasing.
        counts: ``B + 3`` counts: ``[below edges[0], bin 0 .. bin B-1, above edges[-1], nonfinite]``.
    """

    edges: tuple[float, ...]
    counts: tuple[float, ...]

    @property
    def in_range(self) -> tuple[float, ...]:
        return self.counts[1:-2]

    @property
    def below(self) -> float:
        return self.counts[0]

    @property
    def above(self) -> float:
        return self.counts[-2]

    @property
    def nonfinite(self) -> float:
        return self.counts[-1]


class Sink(Protocol):
    """Something that records a run's health numbers.

    ``write`` is called at every sampled step; the rest are called by :class:`~lightning_health.sinks.SinkSet`
    only where the dashboard shows them. Subclass :class:`SinkBase` to get no-op defaults.
    """

    takes_images: bool

    def start(self, settings: Mapping[str, Any], layers: Sequence[str]) -> None:
        """Once at the start of fit: the monitor's settings and the monitored layers, in forward order."""

    def write(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, Histogram]) -> None:
        """One sampled step's scalars (``health/<metric>/<layer>``) and histograms."""

    def findings(self, step: int, findings: Sequence[Finding]) -> None:
        """The whole diagnosis, whenever it changed."""

    def image(self, step: int, tag: str, rgb: np.ndarray) -> None:
        """An ``H x W x 3`` uint8 picture (the dead-fraction heatmap)."""

    def finish(self, step: int, summary: Mapping[str, Any]) -> None:
        """Once at the end of training: the run's summary numbers (final dead fraction per layer, ...)."""

    def close(self) -> None:
        """At teardown: release what the sink opened itself."""


class SinkBase:
    """No-op defaults for the optional parts of :class:`Sink`."""

    takes_images = False

    def start(self, settings: Mapping[str, Any], layers: Sequence[str]) -> None:
        return None

    def write(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, Histogram]) -> None:
        return None

    def findings(self, step: int, findings: Sequence[Finding]) -> None:
        return None

    def image(self, step: int, tag: str, rgb: np.ndarray) -> None:
        return None

    def finish(self, step: int, summary: Mapping[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None
