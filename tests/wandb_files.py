"""Read an offline W&B run back from disk: the records in its ``run-<id>.wandb`` file.

The file is a LevelDB-style log (what ``wandb sync`` uploads): a 7-byte header (``:W&B``, magic
``0xBEE1``, version 0) then 32 KiB blocks of chunks, each ``crc32 (4) | length (2, LE) | type (1)``
followed by the payload; FULL/FIRST/MIDDLE/LAST chunks join into serialized ``wandb.proto`` Records.
wandb 0.31 ships no reader in Python (the reading side moved into the Go core), hence this one.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[Any]:
    """Every ``wandb_internal_pb2.Record`` in a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), "not a .wandb file"
    records, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        payload = data[pos + _HEADER : pos + _HEADER + length]
        if len(payload) < length:  # the service is still writing this record: read what is whole
            break
        pos += _HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = payload if kind in (_FULL, _FIRST) else pending + payload
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(run_dir: str | Path, timeout: float = 20.0) -> dict[str, Any]:
    """``{"history": [row dicts], "config": {...}, "summary": {...}, "metrics": [MetricRecord]}`` of one run.

    ``wandb.finish()`` can return before the service has written the last records, so this waits
    (up to ``timeout`` seconds) for the run's ``exit`` record.
    """
    (wandb_file,) = Path(run_dir).glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = read_records(wandb_file)
        except DecodeError:  # a record half written as the file was read: read it again
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
            continue
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    out: dict[str, Any] = {"history": [], "config": {}, "summary": {}, "metrics": []}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            for i in record.config.update:
                out["config"][_key(i)] = json.loads(i.value_json)
        elif kind == "summary":
            for i in record.summary.update:
                out["summary"][_key(i)] = json.loads(i.value_json)
        elif kind == "metric":
            out["metrics"].append(record.metric)
    return out
