"""Reading a split that lies in shards: one token array and one document index over memory-mapped shard files.

Nothing here loads a split: a shard's tokens are mapped on first use and only the pages a batch touches are
read, so a training process reads just its own rows. Positions are global (shard after shard, in order), so a
window or a document may span two shards and reads the same as in one file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Shard:
    tokens: Path
    offsets: np.ndarray  # int64 [documents + 1], memory-mapped, local to the shard
    n_tokens: int


class Tokens:
    """A split's tokens as one read-only array: `len`, `dtype`, and indexing by an int, a slice or an integer
    array of any shape (the result has its shape). `np.asarray` of it copies the whole split into memory."""

    def __init__(self, shards: list[Shard], dtype: np.dtype):
        self._shards, self.dtype = shards, np.dtype(dtype)
        self._starts = np.concatenate([[0], np.cumsum([s.n_tokens for s in shards], dtype=np.int64)])
        self._maps: dict[int, np.ndarray] = {}
        self.shape = (int(self._starts[-1]),)
        self.ndim = 1

    def __len__(self) -> int:
        return self.shape[0]

    def _map(self, i: int) -> np.ndarray:
        if i not in self._maps:
            shard = self._shards[i]
            self._maps[i] = (np.memmap(shard.tokens, dtype=self.dtype, mode="r", shape=(shard.n_tokens,))
                             if shard.n_tokens else np.zeros(0, self.dtype))
        return self._maps[i]

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step, dtype=np.int64)]
            return self._range(start, max(start, stop))
        if isinstance(index, (int, np.integer)):
            i = int(index) + len(self) if index < 0 else int(index)
            if not 0 <= i < len(self):
                raise IndexError(f"index {int(index)} is out of bounds for {len(self)} tokens")
            shard = int(np.searchsorted(self._starts, i, side="right")) - 1
            return self._map(shard)[i - self._starts[shard]]
        return self._gather(np.asarray(index))

    def _range(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces = []
        shard = first
        while start < stop:
            end = min(stop, int(self._starts[shard + 1]))
            pieces.append(self._map(shard)[start - self._starts[shard]:end - self._starts[shard]])
            start, shard = end, shard + 1
        if len(pieces) == 1:
            return np.array(pieces[0])
        return np.concatenate(pieces) if pieces else np.zeros(0, self.dtype)

    def _gather(self, index: np.ndarray) -> np.ndarray:
        if index.dtype.kind not in "iu":
            raise IndexError(f"tokens are indexed by integers, not {index.dtype}")
        flat = index.reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"an index is out of bounds for {len(self)} tokens")
        shard = np.searchsorted(self._starts, flat, side="right") - 1
        out = np.empty(flat.shape, self.dtype)
        for i in np.unique(shard):
            sel = shard == i
            out[sel] = self._map(int(i))[flat[sel] - self._starts[i]]
        return out.reshape(index.shape)

    def __array__(self, dtype=None, copy=None):
        whole = self._range(0, len(self))
        return whole if dtype is None else whole.astype(dtype)


class Documents:
    """A split's document index: document d spans tokens [start(d), end(d)) of the split's `Tokens`."""

    def __init__(self, shards: list[Shard]):
        self._shards = shards
        self._token_starts = np.concatenate([[0], np.cumsum([s.n_tokens for s in shards], dtype=np.int64)])
        self._doc_starts = np.concatenate([[0], np.cumsum([len(s.offsets) - 1 for s in shards], dtype=np.int64)])

    def __len__(self) -> int:
        return int(self._doc_starts[-1])

    def bounds(self, docs) -> tuple[np.ndarray, np.ndarray]:
        """(start, end) token positions of each document in `docs`."""
        docs = np.asarray(docs, dtype=np.int64)
        if docs.size and (docs.min() < 0 or docs.max() >= len(self)):
            raise IndexError(f"a document index is out of bounds for {len(self)} documents")
        shard = np.searchsorted(self._doc_starts, docs, side="right") - 1
        starts, ends = np.empty_like(docs), np.empty_like(docs)
        for i in np.unique(shard):
            sel = shard == i
            local = docs[sel] - self._doc_starts[i]
            offsets = self._shards[i].offsets
            starts[sel] = offsets[local] + self._token_starts[i]
            ends[sel] = offsets[local + 1] + self._token_starts[i]
        return starts, ends

    def containing(self, positions) -> np.ndarray:
        """The document each token position lies in (same shape as `positions`)."""
        positions = np.asarray(positions, dtype=np.int64)
        flat = positions.reshape(-1)
        shard = np.searchsorted(self._token_starts, flat, side="right") - 1
        out = np.empty_like(flat)
        for i in np.unique(shard):
            sel = shard == i
            local = np.searchsorted(self._shards[i].offsets, flat[sel] - self._token_starts[i], side="right") - 1
            out[sel] = local + self._doc_starts[i]
        return out.reshape(positions.shape)

    def offsets(self) -> np.ndarray:
        """Every document's start, and the split's end: int64 [documents + 1], in memory (8 bytes a document)."""
        pieces = [s.offsets[:-1] + start for s, start in zip(self._shards, self._token_starts)]
        return np.concatenate([*pieces, [self._token_starts[-1]]]).astype(np.int64)
