"""TensorBoard's event checksums in C: the writer thread stops holding the GIL through the next step.

TensorBoard without TensorFlow checksums every event record it writes with a CRC-32C computed in
pure Python (``tensorboard.compat.tensorflow_stub``), about 0.17 microseconds a byte, in the event
writer's background thread. A sampled step's one event (every scalar and histogram of the step,
~12 KB on the benchmark's 4-layer CNN) costs that thread ~2 ms of Python, holding the GIL while
the next training step runs and needs it. ``google-crc32c`` (installed with the
``tensorboard`` extra) gives the same checksums from C in about a microsecond.

:func:`use_c_checksums` swaps it into TensorBoard's record writer. The bytes written do not change
(the same CRC-32C, the same masking), so every reader accepts them; it affects every TensorBoard
writer of the process, the user's own included, which only get faster. Nothing is swapped when the
C implementation is missing or the writer already uses another checksum (a newer TensorBoard).
"""

from __future__ import annotations

from typing import Any

_STUB = "tensorboard.compat.tensorflow_stub.pywrap_tensorflow"
"""The module of TensorBoard's pure-Python CRC-32C."""
_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def _masked(crc: int) -> int:
    """TFRecord's masking of a CRC-32C (``masked_crc32c`` of TensorBoard's stub)."""
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _U32


def _c_checksum() -> Any:
    """``google_crc32c.value`` when its C implementation is installed, else ``None``."""
    try:
        import google_crc32c
    except ImportError:
        return None
    return google_crc32c.value if getattr(google_crc32c, "implementation", "") == "c" else None


_C_VALUE: Any = _c_checksum()


def masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C of ``data``, from C; TensorBoard's writer calls it once swapped in.

    Example:
        >>> masked_crc32c(b"123456789") == _masked(0xE3069283)  # CRC-32C's check value, from C or Python
        True
    """
    if _C_VALUE is None:
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as python_crc

        return int(python_crc(data))
    return _masked(int(_C_VALUE(data)))


def use_c_checksums() -> bool:
    """Make TensorBoard's record writer checksum in C; whether it does now (see the module doc)."""
    try:
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return False
    current = getattr(record_writer, "masked_crc32c", None)
    if current is masked_crc32c:
        return True
    if _C_VALUE is None or getattr(current, "__module__", None) != _STUB:
        return False
    record_writer.masked_crc32c = masked_crc32c
    return True
