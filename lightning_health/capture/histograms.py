"""A sampled step's histograms: the hooks copy a strided sample, the step end bins them all at once.

Binning each tensor's sample inside its hook cost about six ops per tensor (non-finite mapping,
``bucketize``, ``bincount`` or a scatter, widening, adding micro-batches): on a GPT-2 that is ~300
kernel launches a sampled step, on a CPU ~1 ms of per-op overhead and binary searches. Here a hook
only copies its sample (one op; the sample must outlive the tensor), and :meth:`StepHistograms.counts`
bins every sample that shares a set of edges in one batch, on a CPU through
:class:`~lightning_health.readings.binning.Binning`'s exact lookup. The counts are those of
:func:`~lightning_health.readings.reductions.histogram_counts` on each sample, summed over a layer's
calls.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_health.readings import reductions as R
from lightning_health.readings.binning import Binning

ACT, GRAD = "act", "grad"
PENDING_LIMIT = 1 << 22
"""Sampled values held before they are binned early (16 MiB): many micro-batches per step add samples."""


class StepHistograms:
    """The histogram samples of one sampled step, per ``(kind, layer index)``, binned in batches.

    Args:
        act_edges: activation edges per layer name (``None``: no activation histograms).
        grad_edges: the gradients' edges (``None``: none).
        samples: the strided sample size per tensor (``histogram_samples``).
    """

    def __init__(self, act_edges: Mapping[str, Tensor] | None, grad_edges: Tensor | None, samples: int) -> None:
        self.samples = samples
        self._device_edges: dict[tuple[str | None, torch.device], tuple[Tensor, Tensor]] = {}  # made once
        # each set of edges by value (layers share them), and its CPU lookup: made here, before training,
        # as they read values on the host; other devices' binnings need no host read and come when used
        self._sources: dict[str | None, Tensor] = {name: edges for name, edges in (act_edges or {}).items()}
        if grad_edges is not None:
            self._sources[None] = grad_edges
        self._edge_keys = {layer: tuple(edges.float().tolist()) for layer, edges in self._sources.items()}
        cpu = torch.device("cpu")
        self._binnings: dict[tuple[tuple[float, ...], torch.device], Binning] = {}
        for layer, key in self._edge_keys.items():
            if (key, cpu) not in self._binnings:
                self._binnings[(key, cpu)] = Binning(self.edges_on(layer, cpu)[1])
        self._offsets: dict[tuple[object, ...], Tensor] = {}
        # group (edges, device) -> [(kind, index, sample)], and the counts binned early
        self._pending: dict[tuple[tuple[float, ...], torch.device], list[tuple[str, int, Tensor]]] = {}
        self._held = 0
        self._binned: dict[tuple[str, int], Tensor] = {}

    def edges_on(self, layer: str | None, device: torch.device) -> tuple[Tensor, Tensor]:
        """Edges (a layer's, or the gradients' for ``None``) and their bucket boundaries on ``device``,
        made there once: a per-call copy would block the host on an accelerator."""
        key = (layer, device)
        cached = self._device_edges.get(key)
        if cached is None:
            edges = self._sources[layer].to(device=device, dtype=torch.float32)
            cached = self._device_edges[key] = (edges, R.bucket_boundaries(edges))
        return cached

    def take(self, kind: str, index: int, layer: str | None, x: Tensor) -> None:
        """Keep a copy of ``x``'s strided sample for the histogram of ``(kind, index)`` (``layer``: the
        name whose activation edges apply, ``None`` for gradients)."""
        sample = R.histogram_sample(x, self.samples)
        if sample.numel() == 0:
            return
        if sample.data_ptr() == x.data_ptr() or not sample.is_contiguous():  # a view of x: copy it
            sample = sample.clone(memory_format=torch.contiguous_format)
        group = (self._edge_keys[layer], sample.device)
        if group not in self._binnings:
            self._binnings[group] = Binning(self.edges_on(layer, sample.device)[1])
        self._pending.setdefault(group, []).append((kind, index, sample))
        self._held += sample.numel()
        if self._held > PENDING_LIMIT:
            self._bin_pending()

    def counts(self) -> dict[tuple[str, int], Tensor]:
        """Every ``(kind, layer index)``'s counts this step (float64, the
        :func:`~lightning_health.readings.reductions.histogram_counts` layout); the samples are released."""
        self._bin_pending()
        out, self._binned = self._binned, {}
        return out

    def clear(self) -> None:
        """Drop this step's samples and counts (a new sampled step or validation pass starts)."""
        self._pending, self._binned, self._held = {}, {}, 0

    def _bin_pending(self) -> None:
        for group, entries in self._pending.items():
            rows: dict[tuple[str, int], int] = {}
            for kind, index, _sample in entries:
                rows.setdefault((kind, index), len(rows))
            table = self._batched(
                [s for _k, _i, s in entries], [rows[(k, i)] for k, i, _s in entries], len(rows), group
            )
            for key, row in rows.items():
                prev = self._binned.get(key)
                self._binned[key] = table[row] if prev is None else prev + table[row]
        self._pending, self._held = {}, 0

    def _batched(self, samples: list[Tensor], rows: list[int], n_rows: int, group: tuple[object, ...]) -> Tensor:
        """``(n_rows, slots)`` float64 counts: row ``r`` sums the samples mapped to it."""
        binning = self._binnings[group]  # type: ignore[index]
        width = binning.slots_count
        values = torch.cat(samples) if len(samples) > 1 else samples[0]
        slots = binning.slots(values)
        if n_rows > 1:
            offsets = self._row_offsets([s.numel() for s in samples], rows, width, values.device)
            slots = slots.to(offsets.dtype).add_(offsets)
        return R.slot_counts(slots, n_rows * width).view(n_rows, width)

    def _row_offsets(self, lengths: list[int], rows: list[int], width: int, device: torch.device) -> Tensor:
        """Each value's row times ``width``, made once per layout (the same every sampled step) on the
        device itself, from fills: no host-to-device copy, which would block the host on CUDA."""
        key = (tuple(lengths), tuple(rows), width, device)
        offsets = self._offsets.get(key)
        if offsets is None:
            if len(self._offsets) >= 8:  # a layout changes only when layers or shapes change: keep a few
                self._offsets.clear()
            small = device.type == "cpu" and max(rows) * width < 2**31
            dtype = torch.int32 if small else torch.int64  # the dtype of the slots: the CPU lookup's, bucketize's
            parts = [torch.full((n,), row * width, dtype=dtype, device=device) for row, n in zip(rows, lengths)]
            offsets = self._offsets[key] = torch.cat(parts)
        return offsets
