"""The sink interface and the histogram record sinks receive."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Protocol


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
    """Something that records a sampled step's numbers."""

    def write(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, Histogram]) -> None: ...
