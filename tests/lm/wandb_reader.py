"""Read the history rows of an offline W&B run file (`run-*.wandb`) without network or wandb's own reader.

The file is a ":W&B" header followed by a LevelDB-style log: 32 KiB blocks of records, each with a
7-byte header (crc32c, little-endian length, type: 1 full, 2 first, 3 middle, 4 last); every complete
record is a serialised `wandb_internal_pb2.Record`.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK = 32768
_HEADER = 7


def records(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, out, pending = _HEADER, [], b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
    return out


def _parsed(path: Path):
    """Every record of the file as a `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        yield rec


def history(path: Path) -> list[dict]:
    return [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            for rec in _parsed(path) if rec.WhichOneof("record_type") == "history"]


def finished_history(path: Path, timeout_s: float = 30.0) -> list[dict]:
    """history() once the run's exit record is in the file. W&B's service process writes the offline file
    and can still be appending the last records when `run.finish()` has returned; past the timeout, whatever
    the file holds."""
    import time

    def exited() -> bool:
        return any(rec.WhichOneof("record_type") == "exit" for rec in _parsed(path))

    deadline = time.monotonic() + timeout_s
    while not exited() and time.monotonic() < deadline:
        time.sleep(0.1)
    return history(path)
