"""Batches cut from a token store: a grain pipeline for training, a fixed list for evaluation.

A sample is a window of seq_len + 1 consecutive tokens: the model reads [:, :-1] and predicts [:, 1:].

Training windows. An epoch is n = n_train_tokens // seq_len - 1 windows on the grid
start = phase + k * seq_len; each epoch draws its phase in [0, seq_len) and its order of k from the
seed (grain `shuffle` reseeds per epoch under `repeat`), so later epochs see other cuts of the text.
The ragged tail of each epoch's grid is simply not used that epoch.

Packed mode (packed=True). Windows are cut from the same stream of concatenated documents;
`segment_ids` [batch, seq_len + 1] numbers the documents inside each window 1, 2, ... in order
(0 is never used, so it can mean padding elsewhere). The target of position t is in the same
document iff segment_ids[:, t] == segment_ids[:, t + 1]: `loss_mask` gives that mask, which drops
exactly the predictions of a document's first token from the previous document's last token.
Unpacked batches carry no ids: the model then reads across document boundaries, as in plain
concatenated-text pretraining.

Document rows (rows=Rows("documents", pad_id, score_padding)): the projection-sharing paper's protocol. Each
row is one document: its first seq_len + 1 tokens, padded with `pad_id` (EOS in the paper); training draws
documents in a seeded order per epoch, eval takes the val documents in order. With score_padding the
padding targets are scored as the paper did; without it `loss_mask` leaves them out.

Sharding contract. `batch_size` is the global batch. Global batch j depends only on (store, seed,
seq_len, batch_size), never on the number of processes; process p of P receives rows
[p * B/P, (p + 1) * B/P) of it. So processes get disjoint rows, their rows concatenated in process
order are the one-process batch, and a state saved under one process count restores under another.

Iterator state: a JSON-serialisable dict holding grain's state plus the data settings; `set_state`
refuses a state saved with other settings instead of silently resuming a different stream.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import grain
import numpy as np

from lm.data.errors import DataError
from lm.data.store import TokenStore, open_store

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Rows:
    """How a batch row is cut from the token stream: `windows` of the concatenated documents (the default), or
    `documents`, one per row, cut to seq_len + 1 and padded with `pad_id`, the padding scored or masked. Without
    `score_last` a row's last target is never scored (and a document is cut to seq_len tokens): the model reads
    tokens[:seq_len] and predicts seq_len - 1 of them, as a model that shifts its labels inside does."""

    kind: str = "windows"
    pad_id: int | None = None
    score_padding: bool = True
    score_last: bool = True

    def __post_init__(self):
        if self.kind not in ("windows", "documents"):
            raise DataError(f"data.rows must be windows or documents, got {self.kind!r}")
        if self.kind == "documents" and self.pad_id is None:
            raise DataError("data.rows=documents pads each document to seq_len + 1: set data.pad_id (the EOS id of "
                            "the tokenizer, e.g. 50256 for GPT-2)")

    def settings(self) -> dict:
        out = {} if self.kind == "windows" else {"rows": self.kind, "pad_id": self.pad_id,
                                                 "score_padding": self.score_padding}
        return out if self.score_last else {**out, "score_last": False}

    def last_unscored(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`batch` with its rows' last target left out of the loss (when not `score_last`)."""
        if self.score_last:
            return batch
        rows, width = batch["tokens"].shape
        mask = batch.get("loss_mask", np.ones((rows, width - 1), bool)).copy()
        mask[:, -1] = False
        return {**batch, "loss_mask": mask}


WINDOWS = Rows()


def loss_mask(segment_ids):
    """[batch, seq_len] mask over targets tokens[:, 1:]: False where a target belongs to the next document."""
    return segment_ids[:, :-1] == segment_ids[:, 1:]


def _derive_seed(seed: int, *salt) -> int:
    """A 32-bit seed per purpose, so that the user's seed s and s + 1 give unrelated streams."""
    return int.from_bytes(hashlib.sha256(repr((seed, *salt)).encode()).digest()[:4], "big")


class _Windows:
    """Gathers windows starting at given offsets of one split, with segment ids when packed."""

    def __init__(self, store: TokenStore, split: str, seq_len: int, packed: bool, rows: Rows = WINDOWS):
        self._tokens = store.split(split)
        self._documents = store.documents(split) if packed else None
        self._span = np.arange(seq_len + 1)
        self._rows = rows

    def __call__(self, starts) -> dict[str, np.ndarray]:
        index = np.asarray(starts, dtype=np.int64)[:, None] + self._span
        batch = {"tokens": np.asarray(self._tokens[index], dtype=np.int32)}
        if self._documents is not None:
            doc = self._documents.containing(index)
            batch["segment_ids"] = (doc - doc[:, :1] + 1).astype(np.int32)
        return self._rows.last_unscored(batch)


class _Documents:
    """Rows of whole documents of one split: each document's first seq_len + 1 tokens, then `pad_id`."""

    def __init__(self, store: TokenStore, split: str, seq_len: int, rows: Rows):
        self._tokens = store.split(split)
        self._documents = store.documents(split)
        self._width, self._rows = seq_len + 1, rows
        self._keep = seq_len + 1 if rows.score_last else seq_len  # tokens of a document a row holds

    def __call__(self, docs) -> dict[str, np.ndarray]:
        starts, ends = self._documents.bounds(docs)
        tokens = np.full((len(starts), self._width), self._rows.pad_id, np.int32)
        lengths = np.minimum(ends - starts, self._keep)
        for row, (start, n) in enumerate(zip(starts, lengths)):
            tokens[row, :n] = self._tokens[start:start + n]
        batch = {"tokens": tokens}
        if not self._rows.score_padding:  # target t is tokens[:, t + 1]: real while t + 1 < the document's length
            batch["loss_mask"] = np.arange(1, self._width)[None, :] < lengths[:, None]
        return self._rows.last_unscored(batch)


class TrainIterator(grain.DatasetIterator):
    """Endless training batches; a grain iterator, so grain's orbax checkpoint handler can save it too."""

    def __init__(self, parent: grain.DatasetIterator, settings: dict):
        super().__init__(parent)
        self._settings = settings

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, **self._settings, "grain": self._parent.get_state()}

    def set_state(self, state: dict) -> None:
        # Every setting either side has: a state saved with a setting this iterator lacks is another stream too.
        keys = dict.fromkeys(["version", *self._settings, *(k for k in state if k != "grain")])
        now = {"version": STATE_VERSION, **self._settings}
        saved, expected = ({k: d.get(k) for k in keys} for d in (state, now))
        if saved != expected or "grain" not in state:
            diff = ", ".join(f"{k}: saved {saved[k]!r}, now {v!r}" for k, v in expected.items() if saved[k] != v)
            raise DataError(f"data iterator state does not match this run ({diff or 'no grain state'}); resume with "
                            "the data settings the checkpoint was made with, or start the data stream afresh")
        self._parent.set_state(state["grain"])


def _as_store(store: TokenStore | str | Path) -> TokenStore:
    return store if isinstance(store, TokenStore) else open_store(store)


def _positive(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")


def _process_slot(process_index, process_count, batch_size: int) -> tuple[int, int]:
    if (process_index is None) != (process_count is None):
        raise DataError("pass both process_index and process_count, "
                        "or neither to use jax.process_index()/process_count()")
    if process_index is None:
        import jax  # only here: the data layer is usable without initialising a backend

        process_index, process_count = jax.process_index(), jax.process_count()
    _positive(process_count=process_count)
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is outside 0..{process_count - 1}; "
                        "pass the index of this process")
    if batch_size % process_count:
        raise DataError(f"global batch_size {batch_size} is not divisible by the {process_count} processes; "
                        "make the batch size a multiple of the process count")
    return int(process_index), int(process_count)


def train_iterator(store: TokenStore | str | Path, *, seq_len: int, batch_size: int, seed: int, packed: bool = False,
                   process_index: int | None = None, process_count: int | None = None,
                   rows: Rows = WINDOWS) -> TrainIterator:
    """Endless batches {"tokens": int32 [batch_size / process_count, seq_len + 1]} (+ "segment_ids" when packed,
    + "loss_mask" for document rows with masked padding)."""
    store = _as_store(store)
    _positive(seq_len=seq_len, batch_size=batch_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise DataError(f"seed must be an integer, got {seed!r}")
    index, count = _process_slot(process_index, process_count, batch_size)
    settings = {"store": store.fingerprint, "seed": int(seed), "seq_len": seq_len, "batch_size": batch_size,
                "packed": bool(packed), **rows.settings()}
    if rows.kind == "documents":
        if packed:
            raise DataError("data.rows=documents puts one document in each row: there is nothing to pack; set "
                            "data.packed=false")
        n_docs = store.n_documents("train")
        ds = (grain.MapDataset.range(n_docs)
              .shuffle(seed=_derive_seed(seed, "shuffle"))
              .repeat()
              .batch(batch_size // count, drop_remainder=True)
              .slice(slice(index, None, count))
              .map(_Documents(store, "train", seq_len, rows)))
        return TrainIterator(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).__iter__(),
                             settings)
    n_tokens = store.n_tokens("train")
    n_windows = n_tokens // seq_len - 1
    if n_windows < 1:
        raise DataError(f"the train split of {store.path} has {n_tokens} tokens, too few for seq_len {seq_len} "
                        f"(needs at least {2 * seq_len}); lower seq_len or use a larger corpus")

    def window_start(i: int, k: int) -> int:
        return _derive_seed(seed, "phase", i // n_windows) % seq_len + k * seq_len

    ds = (grain.MapDataset.range(n_windows)
          .shuffle(seed=_derive_seed(seed, "shuffle"))
          .repeat()
          .map_with_index(window_start)
          .batch(batch_size // count, drop_remainder=True)
          .slice(slice(index, None, count))
          .map(_Windows(store, "train", seq_len, packed, rows)))
    # A batch takes well under a millisecond to gather while the device runs the previous step: threads buy nothing.
    parent = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).__iter__()
    return TrainIterator(parent, settings)


def eval_batches(store: TokenStore | str | Path, *, seq_len: int, batch_size: int, max_batches: int | None = None,
                 packed: bool = False, process_index: int | None = None,
                 process_count: int | None = None, rows: Rows = WINDOWS) -> list[dict[str, np.ndarray]]:
    """Non-overlapping windows over the val split, in order: every val token is predicted at most once.

    Windows start at multiples of seq_len (each window's last token is the next one's first), the
    ragged tail and a last partial batch are dropped; sharded across processes like training. Document rows:
    the val documents in order, one per row, a last partial batch dropped.
    """
    store = _as_store(store)
    _positive(seq_len=seq_len, batch_size=batch_size)
    if max_batches is not None:
        _positive(max_batches=max_batches)
    index, count = _process_slot(process_index, process_count, batch_size)
    local = batch_size // count
    if rows.kind == "documents":
        n_batches = store.n_documents("val") // batch_size
        if n_batches == 0:
            raise DataError(f"the val split of {store.path} has fewer documents than one eval batch of {batch_size}; "
                            f"lower the batch size or hold out more (`attnlab data prepare ... --val-fraction`)")
        n_batches = n_batches if max_batches is None else min(n_batches, max_batches)
        docs = np.arange(n_batches * batch_size, dtype=np.int64).reshape(n_batches, batch_size)
        gather = _Documents(store, "val", seq_len, rows)
        return [gather(row[index * local:(index + 1) * local]) for row in docs]
    n_tokens = store.n_tokens("val")
    n_windows = (n_tokens - 1) // seq_len
    if n_windows == 0:
        raise DataError(f"seq_len {seq_len} is longer than the val split of {store.path} ({n_tokens} tokens, a window "
                        "needs seq_len + 1); lower seq_len or hold out more: `attnlab data prepare ... --val-fraction 0.05 --overwrite` "
                        "(data.val_fraction for the default corpus)")
    n_batches = n_windows // batch_size
    if n_batches == 0:
        raise DataError(f"the val split of {store.path} holds {n_windows} windows of seq_len {seq_len}, fewer than one "
                        f"batch of {batch_size}; lower the eval batch size or seq_len, "
                        "or hold out more: `attnlab data prepare ... --val-fraction 0.05 --overwrite` (data.val_fraction "
                        "for the default corpus)")
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    starts = (np.arange(n_batches * batch_size, dtype=np.int64) * seq_len).reshape(n_batches, batch_size)
    gather = _Windows(store, "val", seq_len, packed, rows)
    return [gather(row[index * local:(index + 1) * local]) for row in starts]
