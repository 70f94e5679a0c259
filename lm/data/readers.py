"""The documents of one corpus file, streamed: a file is never held in memory whole (a .txt file, which is one
document, excepted).

    text        the whole file is one document (key: the file's name)
    jsonl       one JSON object per line, its "text" field the document (key: name:line); blank lines skipped;
                also gzip- (jsonl.gz) or zstd-compressed (jsonl.zst), decompressed while read
    parquet     the "text" column, one document per row (key: name:row); null rows skipped; read by row batches

Every record carries its position: how many lines (rows; 1 for a .txt) of the file it ends, so reading again
from that position yields exactly the records after it. A resumed preparation starts there without parsing
what lies before. Bytes that are not UTF-8 become U+FFFD and the record says so: one stray byte should not
sink a corpus, and the count is logged so it is never silent.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from lm.data.errors import DataError
from lm.data.sources import SourceFile

_PARQUET_BATCH_ROWS = 1024
_READ_BUFFER = 1 << 20


@dataclass(frozen=True)
class Record:
    pos: int  # reading again from this position yields the records after this one
    key: str  # what the train/val split hashes
    text: str  # may be empty: the caller counts and skips empty documents
    replaced: bool  # some bytes were not UTF-8 and became U+FFFD


class Meter:
    """How many bytes of the file being read have been consumed (compressed bytes for compressed files)."""

    def __init__(self):
        self.done = 0


def records(f: SourceFile, start: int = 0, meter: Meter | None = None) -> Iterator[Record]:
    """The records of `f` after position `start`."""
    meter = meter or Meter()
    meter.done = 0
    if f.kind == "text":
        if start < 1:
            data = f.path.read_bytes()
            meter.done = len(data)
            text, replaced = _decode(data)
            yield Record(1, f.name, text, replaced)
    elif f.kind == "parquet":
        yield from _parquet(f, start, meter)
    else:
        yield from _jsonl(f, start, meter)


def _decode(data: bytes) -> tuple[str, bool]:
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def _jsonl(f: SourceFile, start: int, meter: Meter) -> Iterator[Record]:
    lineno = 0
    with open(f.path, "rb") as raw:
        for line in _lines(_chunks(f, raw, meter)):
            lineno += 1
            if lineno > start:
                record = _jsonl_record(f, lineno, line)
                if record is not None:
                    yield record


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Lines split at b"\n" only (a JSON string may hold a raw U+2028, which str.splitlines would cut); a line
    longer than a chunk is joined once, not copied chunk after chunk."""
    pending: list[bytes] = []
    for chunk in chunks:
        parts = chunk.split(b"\n")
        if len(parts) == 1:
            pending.append(chunk)
            continue
        yield b"".join([*pending, parts[0]])
        yield from parts[1:-1]
        pending = [parts[-1]] if parts[-1] else []
    if pending:
        yield b"".join(pending)


def _chunks(f: SourceFile, raw, meter: Meter) -> Iterator[bytes]:
    """The file's bytes, decompressed, a block at a time. A compressed file may hold several frames (gzip
    members); one that stops before its end is a truncated file, which the decoders themselves let pass."""
    blocks = iter(lambda: raw.read(_READ_BUFFER), b"")
    if f.kind == "jsonl":
        for block in blocks:
            meter.done += len(block)
            yield block
        return
    if f.kind == "jsonl.gz":
        what, new, errors = "gzip", lambda: zlib.decompressobj(wbits=31), (zlib.error,)
    else:
        import zstandard

        what, new, errors = "zstd", zstandard.ZstdDecompressor().decompressobj, (zstandard.ZstdError,)
    decoder, fed = new(), False
    try:
        for block in blocks:
            meter.done += len(block)
            while block:
                out = decoder.decompress(block)
                fed = True
                if out:
                    yield out
                block = b""
                if decoder.eof:  # the frame ended inside this block: what follows starts the next one
                    block, decoder, fed = decoder.unused_data, new(), False
    except errors as exc:
        raise DataError(f"{f.path} is not a valid {what} file ({exc}) near byte {meter.done:,}; re-download it or "
                        "remove it from the source") from exc
    if fed:
        raise DataError(f"{f.path} ends inside a {what} frame (the file is truncated); re-download it or remove it "
                        "from the source")


def _jsonl_record(f: SourceFile, lineno: int, line: bytes) -> Record | None:
    text_line, replaced = _decode(line)
    if not text_line.strip():
        return None
    try:
        record = json.loads(text_line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{f.path} line {lineno} is not valid JSON ({exc.msg}); fix or remove that line") from exc
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise DataError(f'{f.path} line {lineno} has no string "text" field; '
                        'every line must look like {"text": "..."}')
    return Record(lineno, f"{f.name}:{lineno}", text, replaced)


def _parquet(f: SourceFile, start: int, meter: Meter) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f.path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{f.path} is not a readable parquet file ({exc}); check the file") from exc
    names = pf.schema_arrow.names
    if "text" not in names:
        raise DataError(f"{f.path} has no 'text' column (columns: {', '.join(names)}); "
                        "rename the text column to 'text'")
    kind = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{f.path} column 'text' has type {kind}, not string; store the documents as strings")
    meta = pf.metadata
    # Skip whole row groups before `start` without decoding them.
    group, row = 0, 0
    while group < meta.num_row_groups and row + meta.row_group(group).num_rows <= start:
        row += meta.row_group(group).num_rows
        group += 1
    done_bytes = sum(meta.row_group(g).total_byte_size for g in range(group))
    total_bytes = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)) or 1
    size = f.path.stat().st_size
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=range(group, meta.num_row_groups),
                                     columns=["text"]):
            for text in batch.column(0).to_pylist():
                row += 1
                if row > start and text is not None:
                    yield Record(row, f"{f.name}:{row - 1}", text, False)
            done_bytes += batch.nbytes
            meter.done = min(size, size * done_bytes // total_bytes)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{f.path} is not a readable parquet file ({exc}) after row {row}; check the file") from exc
