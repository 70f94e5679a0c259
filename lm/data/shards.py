"""Writing a part's shards: runs of consecutive documents of the corpus stream, both splits, each closed at a
document boundary once it holds `shard_tokens` tokens.

    store/train/PPPPP-SSSSS.bin           shard S of part P: its train documents' tokens, concatenated
    store/train/PPPPP-SSSSS.offsets.npy   int64 [documents + 1]: document d is tokens[offsets[d]:offsets[d + 1]]
    store/val/PPPPP-SSSSS.*               the same for its val documents (absent when it has none)
    records/PPPPP-SSSSS.json              written last: where in the stream the shard ends, what it holds; a
                                          shard without a record is unfinished and is written again
    records/PPPPP-SSSSS.counts.npy        how often each token occurs in each split (for the unigram entropy)

A shard's content depends only on the documents before it and `shard_tokens`, so a preparation that is killed
and resumed from its last record writes the very same files as one that never stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

SPLITS = ("train", "val")
ROLES = ("source", "val_source")
SHARD_TOKENS = 100_000_000
# Tokens held in memory per split before they are written out.
_FLUSH_TOKENS = 1 << 22


def shard_name(part: int, shard: int) -> str:
    return f"{part:05d}-{shard:05d}"


def write_file(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a kill leaves the old file or none, never a torn one."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def new_stats() -> dict:
    return {role: {"documents": 0, "empty_skipped": 0, "not_utf8": 0} for role in ROLES}


class _SplitRun:
    """One split's part of the open shard."""

    def __init__(self, path: Path, dtype: np.dtype, vocab_size: int):
        self.path, self.dtype = path, dtype
        self.fh = None
        self.lengths: list[int] = []
        self.pending: list[np.ndarray] = []
        self.n_pending = self.n_tokens = self.n_bytes = 0
        self.counts = np.zeros(vocab_size, np.int64)

    def add(self, ids: np.ndarray, n_bytes: int) -> None:
        self.pending.append(ids)
        self.lengths.append(len(ids))
        self.n_pending += len(ids)
        self.n_tokens += len(ids)
        self.n_bytes += n_bytes
        if self.n_pending >= _FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        if not self.lengths:
            return
        if self.fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(self.path.with_name(self.path.name + ".partial"), "wb")
        if self.pending:
            ids = np.concatenate(self.pending)
            self.counts += np.bincount(ids, minlength=len(self.counts))
            self.fh.write(ids.astype(self.dtype, copy=False).tobytes())
        self.pending, self.n_pending = [], 0

    def finish(self) -> dict:
        self.flush()
        if self.fh is not None:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)]).astype(np.int64)
            with open(self.path.with_suffix(".offsets.npy.partial"), "wb") as fh:
                np.save(fh, offsets)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(self.path.with_suffix(".offsets.npy.partial"), self.path.with_suffix(".offsets.npy"))
            os.replace(self.path.with_name(self.path.name + ".partial"), self.path)
        return {"n_tokens": self.n_tokens, "n_documents": len(self.lengths), "n_bytes": self.n_bytes}

    def abandon(self) -> None:
        if self.fh is not None:
            self.fh.close()


class ShardWriter:
    """The open shard of a part: documents go in, in stream order; `finish` closes it at a document boundary."""

    def __init__(self, store_dir: Path, records_dir: Path, part: int, shard: int, *, dtype: np.dtype,
                 vocab_size: int, shard_tokens: int, tokenizer_fingerprint: str):
        self.store_dir, self.records_dir, self.part, self.shard = store_dir, records_dir, part, shard
        self.dtype, self.vocab_size, self.shard_tokens = dtype, vocab_size, shard_tokens
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self._open()

    def _open(self) -> None:
        name = shard_name(self.part, self.shard)
        self.runs = [_SplitRun(self.store_dir / split / f"{name}.bin", self.dtype, self.vocab_size)
                     for split in SPLITS]
        self.stats = new_stats()
        self.consumed = False  # whether any record of the stream, even an empty document, fell in this shard

    @property
    def full(self) -> bool:
        return sum(run.n_tokens for run in self.runs) >= self.shard_tokens

    def note(self, role: str, *, empty: bool, replaced: bool) -> None:
        """Count one record of the stream (a document, or an empty one skipped) in this shard's stats."""
        stats = self.stats[role]
        stats["empty_skipped" if empty else "documents"] += 1
        stats["not_utf8"] += replaced
        self.consumed = True

    def add(self, split: int, ids: np.ndarray, n_bytes: int) -> None:
        self.runs[split].add(ids, n_bytes)

    def finish(self, end: tuple[int, int]) -> dict | None:
        """Write the shard and its record (`end`: the stream position after its last record), open the next one;
        the record, or None when nothing fell in this shard."""
        if not self.consumed:
            return None
        name = shard_name(self.part, self.shard)
        splits = {split: run.finish() for split, run in zip(SPLITS, self.runs)}
        self.records_dir.mkdir(parents=True, exist_ok=True)
        counts = self.records_dir / f"{name}.counts.npy"
        with open(counts.with_name(counts.name + ".partial"), "wb") as fh:
            np.save(fh, np.stack([run.counts for run in self.runs]))
        os.replace(counts.with_name(counts.name + ".partial"), counts)
        record = {"part": self.part, "shard": self.shard, "end": list(end),
                  "tokenizer": self.tokenizer_fingerprint, "splits": splits, "stats": self.stats}
        write_file(self.records_dir / f"{name}.json", json.dumps(record, indent=1).encode())
        self.shard += 1
        self._open()
        return record

    def abandon(self) -> None:
        for run in self.runs:
            run.abandon()
