"""TensorBoard: scalars, histograms from device-binned counts, the diagnosis panel, findings, heatmap.

Works with Lightning's ``TensorBoardLogger`` (scalars through its ``log_metrics``, the rest through
its ``experiment``, a ``SummaryWriter``) and with a plain ``SummaryWriter`` the user passes to
``HealthMonitor(writer=...)`` (everything through the writer).

No raw activation reaches the host: histograms arrive as counts binned on the device against fixed
edges. NaN/Inf values are counted separately and never passed to TensorBoard (``add_histogram``
raises on NaN); values outside the edges sit in two open-end buckets, so nothing is dropped.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_health.sinks.base import Histogram, SinkBase
from lightning_health.sinks.format import findings_markdown
from lightning_health.sinks.layout import panel_layout
from lightning_health.sinks.record_checksum import use_c_checksums

if TYPE_CHECKING:
    import numpy as np

    from lightning_health.diagnosis import Finding

FINDINGS_TAG = "health/findings"


def is_tensorboard_logger(logger: Any) -> bool:
    """True for Lightning's (or pytorch_lightning's) TensorBoardLogger."""
    return any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__)


def tag_prefix(logger: Any) -> str:
    """What a Lightning logger puts before every metric name (``TensorBoardLogger(prefix=...)``)."""
    prefix = getattr(logger, "_prefix", "") or ""
    return f"{prefix}{getattr(logger, 'LOGGER_JOIN_CHAR', '-')}" if prefix else ""


@functools.lru_cache(maxsize=64)
def _buckets(edges: tuple[float, ...]) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    """TensorBoard's bucket limits and lower ends for ``edges``, and each bucket's centre and its
    square as a ``(2, B + 2)`` array: the same for every histogram of a run, made once."""
    import numpy as np

    left_pad, right_pad = edges[1] - edges[0], edges[-1] - edges[-2]
    # bucket 0 (below) is (edges[0] - pad, edges[0]]; bucket B+1 (above) is (edges[-1], edges[-1] + pad]
    limits = (*edges, edges[-1] + right_pad)
    lows = (edges[0] - left_pad, *edges)
    centres = np.array([(lo + hi) / 2 for lo, hi in zip(lows, limits)], dtype=np.float64)
    return limits, lows, np.stack([centres, centres * centres])


def raw_histogram_args(hist: Histogram) -> dict[str, Any]:
    """Arguments for ``SummaryWriter.add_histogram_raw`` from our counts.

    TensorBoard buckets are ``(limit[i-1], limit[i]]``. Our ``B`` bins keep their edges; the two
    open ends become one extra bucket on each side, a bin-width wide, so out-of-range values stay
    visible without inventing a data range. The nonfinite count is left out (it is logged as the
    ``nonfinite`` scalars), and ``min``/``max`` span the buckets that hold values. ``sum`` and
    ``sum_squares`` are estimated from bucket centres (the exact moments are the scalar readings).
    """
    import numpy as np

    edges, counts = tuple(hist.edges), [float(c) for c in hist.counts[:-1]]  # drop the nonfinite count
    if len(counts) != len(edges) + 1:
        raise ValueError(f"Expected {len(edges) + 1} counts for {len(edges)} edges (plus nonfinite), got {hist.counts}")
    limits, lows, centres = _buckets(edges)
    values = np.array(counts, dtype=np.float64)
    used = np.flatnonzero(values > 0)
    total, squares = (centres @ values).tolist()
    return {
        "min": float(lows[used[0]]) if used.size else float(lows[0]),
        "max": float(limits[used[-1]]) if used.size else float(limits[-1]),
        "num": int(values.sum()),
        "sum": total,
        "sum_squares": squares,
        "bucket_limits": list(limits),
        "bucket_counts": counts,
    }


def _drawable_histograms(histograms: Mapping[str, Histogram]) -> list[tuple[str, dict[str, Any]]]:
    """``(tag, add_histogram_raw arguments)`` of the histograms TensorBoard can draw (values, all finite)."""
    out = []
    for tag, hist in histograms.items():
        args = raw_histogram_args(hist)
        if args["num"] > 0 and all(map(math.isfinite, args["bucket_counts"])):
            out.append((tag, args))
    return out


def _scalar_value(tag: str, value: float) -> Any:
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary.Value(tag=tag, simple_value=float(value))


def _image_value(tag: str, rgb: np.ndarray) -> Any:
    """A PNG image summary of ``H x W x C`` uint8 pixels, encoded as they are."""
    import io

    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    height, width, channels = rgb.shape
    encoded = buffer.getvalue()
    return Summary.Value(
        tag=tag, image=Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=encoded)
    )


def _summary(values: list[Any]) -> Any:
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary(value=values)


class TensorBoardSink(SinkBase):
    """Everything the TensorBoard dashboard shows.

    Args:
        logger: a Lightning ``TensorBoardLogger`` (scalars go through its ``log_metrics``).
        writer: a ``SummaryWriter`` to write to directly (when there is no logger).
        owns_writer: close the writer at the end (it was created for this run from a path).
    """

    takes_images = True

    def __init__(self, logger: Any = None, writer: Any = None, owns_writer: bool = False) -> None:
        if (logger is None) == (writer is None):
            raise ValueError("Expected exactly one of `logger` and `writer` for TensorBoardSink")
        self.logger = logger
        self._writer = writer
        self.owns_writer = owns_writer
        use_c_checksums()  # the writer thread's checksums would hold the GIL through the next step

    @property
    def writer(self) -> Any:
        return self._writer if self._writer is not None else self.logger.experiment

    def start(self, settings: Mapping[str, Any], layers: Sequence[str]) -> None:
        if settings.get("dashboard", True):
            self.writer.add_custom_scalars(panel_layout(tag_prefix(self.logger), layers))

    def write(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, Histogram]) -> None:
        """One event per sampled step holding every scalar and histogram.

        Sixty ``add_scalar`` calls cost ~10x one event with sixty values (1.5 ms against 0.16 ms
        measured here), and every sampled step pays it. Tags get the logger's prefix exactly as
        ``TensorBoardLogger.log_metrics`` would add it.
        """
        file_writer = getattr(self.writer, "_get_file_writer", None)
        try:
            from torch.utils.tensorboard.summary import histogram_raw
        except ImportError:  # tensorboardX without tensorboard: one call per value
            file_writer = None
        if file_writer is None:
            self._write_one_by_one(step, scalars, histograms)
            return
        prefix = tag_prefix(self.logger)
        values = [_scalar_value(prefix + tag, value) for tag, value in scalars.items()]
        for tag, args in _drawable_histograms(histograms):
            values.extend(histogram_raw(prefix + tag, **args).value)
        if values:
            file_writer().add_summary(_summary(values), step)

    def _write_one_by_one(self, step: int, scalars: Mapping[str, float], histograms: Mapping[str, Histogram]) -> None:
        if scalars and self.logger is not None:
            self.logger.log_metrics(dict(scalars), step=step)
        elif scalars:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, global_step=step)
        for tag, args in _drawable_histograms(histograms):
            self.writer.add_histogram_raw(tag_prefix(self.logger) + tag, global_step=step, **args)

    def findings(self, step: int, findings: Sequence[Finding]) -> None:
        self.writer.add_text(tag_prefix(self.logger) + FINDINGS_TAG, findings_markdown(step, findings), step)

    def image(self, step: int, tag: str, rgb: np.ndarray) -> None:
        """The picture's uint8 pixels PNG-encoded as they are. ``add_image`` widens them to float32,
        scales, clips and resamples them to the same size first: ~10 MiB held for a moment for a
        900 x 350 picture, which set a small model's peak memory at the end of training."""
        file_writer = getattr(self.writer, "_get_file_writer", None)
        if file_writer is None or rgb.dtype.name != "uint8" or rgb.ndim != 3:  # tensorboardX, or not pixels
            self.writer.add_image(tag_prefix(self.logger) + tag, rgb, step, dataformats="HWC")
            return
        file_writer().add_summary(_summary([_image_value(tag_prefix(self.logger) + tag, rgb)]), step)

    def finish(self, step: int, summary: Mapping[str, Any]) -> None:
        self.writer.flush()

    def close(self) -> None:
        if self.owns_writer and self._writer is not None:
            self._writer.close()
