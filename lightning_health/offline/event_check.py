"""Check that TensorBoard event files are whole, so a truncated or corrupted run is reported, not read half silently.

An event file is a sequence of TFRecords: ``length (uint64 LE) | masked crc32c(length) (uint32) | data |
masked crc32c(data) (uint32)``. This walks the framing and checks each length's checksum (12 bytes
a record, cheap even for large files); the payload checksums are not recomputed (pure-Python
crc32c costs about 0.25 s per MiB). A file that ends inside a record, or whose framing stops making
sense, is reported with how many whole records came before the damage.

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "events.out.tfevents.x")
    >>> _ = open(path, "wb").write(b"\\x10\\x00\\x00")
    >>> check_event_file(path).problem
    'truncated: the file ends inside record 1 (3 bytes left over)'
"""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path

_HEADER = 12
_FOOTER = 4


@dataclasses.dataclass(frozen=True)
class EventFileCheck:
    """What :func:`check_event_file` found.

    Attributes:
        path: the event file.
        records: whole records before the end or the damage.
        problem: ``None`` for a whole file, else what is wrong, in words.
    """

    path: Path
    records: int
    problem: str | None


def _masked_crc(data: bytes) -> int:
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    return int(masked_crc32c(data))


def check_event_file(path: str | os.PathLike[str]) -> EventFileCheck:
    """Walk the record framing of one event file (see the module docstring)."""
    file_path = Path(path)
    size = file_path.stat().st_size
    records, offset = 0, 0
    with open(file_path, "rb") as file:
        while offset < size:
            header = file.read(_HEADER)
            if len(header) < _HEADER:
                return EventFileCheck(file_path, records, _truncated(records, size - offset))
            (length,), (crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
            if crc != _masked_crc(header[:8]):
                return EventFileCheck(file_path, records, f"corrupt: record {records + 1} (byte {offset}) is damaged")
            if offset + _HEADER + length + _FOOTER > size:
                return EventFileCheck(file_path, records, _truncated(records, size - offset))
            file.seek(length + _FOOTER, os.SEEK_CUR)
            offset += _HEADER + length + _FOOTER
            records += 1
    return EventFileCheck(file_path, records, None)


def _truncated(records: int, left: int) -> str:
    return f"truncated: the file ends inside record {records + 1} ({left} bytes left over)"


def damaged_event_files(run_dir: str | os.PathLike[str]) -> list[EventFileCheck]:
    """The event files directly in ``run_dir`` that are truncated or corrupt."""
    checks = [check_event_file(p) for p in sorted(Path(run_dir).glob("*tfevents*")) if p.is_file()]
    return [check for check in checks if check.problem is not None]
