"""The rolling per-unit evidence windows of one layer call slot, kept on the device across sampled steps.

:class:`UnitWindow` holds the last ``size`` synced fire masks (a unit is dead when it fired in
none of them); :class:`AbsWindow` the last ``size`` per-unit sums of ``|activation|`` and their
counts (tau-dormancy, :mod:`lightning_health.readings.dormancy`). Both are rings written in place
and checkpointed as plain tensors; :class:`lightning_health.pipeline.accumulate.Accumulator` owns
one of each per (layer, call slot).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_health.readings.dormancy import dormant_mask


class _Ring:
    """Where the next row of a ``size``-row ring goes, and how many rows hold evidence."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.filled = 0
        self.pos = 0

    @property
    def full(self) -> bool:
        return self.filled >= self.size

    def _advance(self) -> None:
        self.pos = (self.pos + 1) % self.size
        self.filled = min(self.filled + 1, self.size)

    def _load_position(self, state: dict[str, object]) -> None:
        self.filled = int(state.get("filled", 0))  # type: ignore[call-overload]
        self.pos = int(state.get("pos", 0))  # type: ignore[call-overload]


class UnitWindow(_Ring):
    """The last ``size`` fire masks of one layer call slot, as a ring on the device."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.ring: Tensor | None = None

    def push(self, fired: Tensor) -> None:
        if self.ring is None or self.ring.shape[1] != fired.numel() or self.ring.device != fired.device:
            self.ring = torch.zeros(self.size, fired.numel(), dtype=torch.bool, device=fired.device)
            self.filled = self.pos = 0
        self.ring[self.pos] = fired
        self._advance()

    def dead(self) -> Tensor:
        """Per-unit bool: never fired in the window."""
        assert self.ring is not None
        return ~self.ring.any(dim=0)

    def state_dict(self) -> dict[str, object]:
        return {"ring": None if self.ring is None else self.ring.cpu(), "filled": self.filled, "pos": self.pos}

    def load_state_dict(self, state: dict[str, object], device: torch.device) -> None:
        ring = state.get("ring")
        self.ring = ring.to(device) if isinstance(ring, Tensor) else None
        if self.ring is not None and self.ring.shape[0] != self.size:  # window size changed: start afresh
            self.ring, self.filled, self.pos = None, 0, 0
            return
        self._load_position(state)


class AbsWindow(_Ring):
    """The last ``size`` per-unit ``|activation|`` sums of one layer call slot and their counts."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.sums: Tensor | None = None
        self.counts: Tensor | None = None

    def push(self, sums: Tensor, count: Tensor) -> None:
        if self.sums is None or self.sums.shape[1] != sums.numel() or self.sums.device != sums.device:
            self.sums = torch.zeros(self.size, sums.numel(), dtype=torch.float64, device=sums.device)
            self.counts = torch.zeros(self.size, dtype=torch.float64, device=sums.device)
            self.filled = self.pos = 0
        assert self.counts is not None
        self.sums[self.pos] = sums
        self.counts[self.pos] = count.reshape(())
        self._advance()

    def dormant(self, tau: float) -> Tensor:
        """Per-unit bool: tau-dormant over the window (see :func:`lightning_health.readings.dormancy.dormant_mask`)."""
        assert self.sums is not None and self.counts is not None
        return dormant_mask(self.sums.sum(dim=0), self.counts.sum(), tau)

    def state_dict(self) -> dict[str, object]:
        return {
            "sums": None if self.sums is None else self.sums.cpu(),
            "counts": None if self.counts is None else self.counts.cpu(),
            "filled": self.filled,
            "pos": self.pos,
        }

    def load_state_dict(self, state: dict[str, object], device: torch.device) -> None:
        sums, counts = state.get("sums"), state.get("counts")
        if not isinstance(sums, Tensor) or not isinstance(counts, Tensor) or sums.shape[0] != self.size:
            self.sums, self.counts, self.filled, self.pos = None, None, 0, 0
            return
        self.sums, self.counts = sums.to(device), counts.to(device)
        self._load_position(state)
