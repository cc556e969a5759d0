"""The sampled step's one device-to-host copy, read when the host needs it, not when it is made.

On CUDA the copy goes without blocking into a pinned host buffer kept across steps (allocating
pinned memory per step would cost more than the copy), and a CUDA event marks its end; the host
reads the values when the monitor lands the step, a training batch later, by which time the copy has
long finished: the device never waits for the monitor's host work. Elsewhere (a CPU tensor) the
values are read at once: there is no device to keep busy, and a read costs nothing.
:func:`to_device` is the way back for the few small index lists a sampled step sends, likewise
without making the device wait.

Example:
    >>> copy = HostCopy(torch.tensor([1.0, 2.0]), {})
    >>> copy.pending, copy.values()
    (False, [1.0, 2.0])
    >>> later = HostCopy(torch.tensor([3.0]), {}, defer=True)  # a CPU copy held back, as CUDA's are
    >>> later.pending, later.values(), later.pending
    (True, [3.0], False)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

DEFER_ON_CPU = False
"""Hold CPU copies back too, as CUDA's are: the tests check the deferred path on machines without CUDA."""


class HostCopy:
    """One device vector on its way to the host.

    Args:
        packed: the device vector (its values must not change until read: a fresh ``torch.cat``).
        pinned: ``{"buf": pinned buffer}`` kept by the caller across steps, reused and grown here.
        defer: hold the read back (``None``: on CUDA only). Only one copy per ``pinned`` may be in
            flight: read it before making the next.
    """

    def __init__(self, packed: Tensor, pinned: dict[str, Tensor], defer: bool | None = None) -> None:
        self._values: list[float] | None = None
        self._event: torch.cuda.Event | None = None
        if not ((packed.is_cuda or DEFER_ON_CPU) if defer is None else defer):
            self._values = packed.tolist()
            self._source = None
            return
        if packed.is_cuda:
            buf = pinned.get("buf")
            if buf is None or buf.numel() < packed.numel() or buf.dtype != packed.dtype:
                buf = pinned["buf"] = torch.empty(packed.numel(), dtype=packed.dtype, pin_memory=True)
            out = buf[: packed.numel()]
            out.copy_(packed.reshape(-1), non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(packed.device))
            self._source = out
        else:
            self._source = packed

    @property
    def pending(self) -> bool:
        """The values have not been read yet."""
        return self._values is None

    def values(self) -> list[float]:
        """The host values; waits for the copy's event first if it is still running."""
        if self._values is None:
            if self._event is not None:
                self._event.synchronize()
            assert self._source is not None
            self._values, self._source, self._event = self._source.tolist(), None, None
        return self._values


class Pending(Generic[T]):
    """What a launched step gives its host side: ``land()`` reads ``copy`` (waiting if needed) and builds the result."""

    def __init__(self, copy: HostCopy, land: Callable[[], T]) -> None:
        self.copy = copy
        self.land = land

    @property
    def pending(self) -> bool:
        """The host copy is still to be read (a CUDA copy, or one deferred on purpose)."""
        return self.copy.pending


def to_device(values: Sequence[float], device: torch.device, dtype: torch.dtype = torch.long) -> Tensor:
    """Host ``values`` as a tensor on ``device``, without a blocking copy on CUDA.

    ``torch.tensor(values, device="cuda")`` copies from pageable memory and waits for the device
    queue to drain first (the GPU check counted two such waits per sampled step). Through pinned
    memory the copy is queued like a kernel; torch's pinned-memory cache keeps the host block until
    the copy has run, so the temporary may go at once.

    Example:
        >>> to_device([2, 0, 1], torch.device("cpu")).tolist()
        [2, 0, 1]
    """
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
