"""What the training loop reads from: a token store, or a synthetic task, behind one small interface.

A dataset gives endless resumable training batches and a fixed list of eval batches. A batch is a
dict of int32 arrays: "tokens" [B, seq_len + 1] and optionally "segment_ids" (same shape, packed
documents), "loss_mask" [B, seq_len] (which targets are scored; synthetic tasks score only their answers)
and "targets" [B, seq_len] (what each position predicts, where that is not the next input token: MQAR's
answers; without it the targets are tokens[:, 1:]).

`data.source` picks it: "stdlib" (prepared on first use), a token-store directory, or
"synthetic:<task>" for a task registered in `SYNTHETIC` (the tasks in lm/data/synthetic register
themselves on import) with its settings from `data.task`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Protocol

from lm import storage
from lm.data import pipeline
from lm.data.errors import DataError
from lm.data.store import TokenStore, check_vocab, default_store_path, open_store
from lm.data.writer import prepare


class Dataset(Protocol):
    vocab_size: int
    description: str

    def train_iterator(self, *, seq_len: int, batch_size: int, seed: int, packed: bool, process_index: int,
                       process_count: int, rows: pipeline.Rows = pipeline.WINDOWS) -> Any: ...

    def eval_batches(self, *, seq_len: int, batch_size: int, max_batches: int | None, process_index: int = 0,
                     process_count: int = 1, rows: pipeline.Rows = pipeline.WINDOWS) -> list[dict]: ...

    def bits_per_byte_factor(self) -> float | None:
        """Multiply a mean loss in nats/token by this for bits per byte; None when text bytes do not apply."""

    def tokenizer(self) -> Any: ...

    def identity(self) -> dict:
        """What identifies the data (and its tokenizer) a run trains on, as JSON: recorded in the run directory
        and compared whenever the run is resumed, evaluated or sampled."""

    def resolved_source(self) -> tuple[str, str]:
        """(data.source, data.tokenizer) as actually used: a token store's absolute path and its tokenizer."""


class StoreDataset:
    """A prepared token store (see lm/data/store.py)."""

    def __init__(self, store: TokenStore, url: str | None = None):
        """`url`: where the store is when `store` is a local copy of one on object storage (lm/storage.py)."""
        self.store, self.url = store, url
        self.vocab_size = store.vocab_size
        self.description = f"token store {url or store.path}"

    def train_iterator(self, **kw):
        return pipeline.train_iterator(self.store, **kw)

    def eval_batches(self, *, seq_len, batch_size, max_batches, process_index=0, process_count=1,
                     rows=pipeline.WINDOWS):
        return pipeline.eval_batches(self.store, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches,
                                     process_index=process_index, process_count=process_count, rows=rows)

    def bits_per_byte_factor(self) -> float:
        return self.store.n_tokens("val") / max(self.store.n_bytes("val"), 1) / math.log(2)

    def tokenizer(self):
        return self.store.tokenizer()

    def identity(self) -> dict:
        tok = self.store.meta["tokenizer"]
        return {"kind": "token_store", "path": self.url or str(self.store.path.resolve()),
                "fingerprint": self.store.fingerprint, "tokenizer": tok["spec"],
                "tokenizer_fingerprint": tok["fingerprint"], "vocab_size": self.vocab_size}

    def resolved_source(self) -> tuple[str, str]:
        return self.url or str(self.store.path.resolve()), self.store.meta["tokenizer"]["spec"]


# name -> factory(task_settings: dict, seed: int) -> Dataset
SYNTHETIC: dict[str, Callable[[dict, int], Dataset]] = {}


def register_synthetic(name: str):
    def deco(factory):
        SYNTHETIC[name] = factory
        return factory

    return deco


def open_dataset(source: str, *, tokenizer: str, data_dir: str | Path, task: dict | None = None, seed: int = 0,
                 val_fraction: float = 0.02, log: Callable[[str], None] | None = print) -> Dataset:
    if source.startswith("synthetic:"):
        import lm.data.synthetic  # noqa: F401  (registers the built-in tasks; it imports this package)
        name = source.split(":", 1)[1]
        if name not in SYNTHETIC:
            known = ", ".join(f"synthetic:{n}" for n in sorted(SYNTHETIC)) or "none"
            raise DataError(f"data.source {source!r}: no such synthetic task (known: {known})")
        return SYNTHETIC[name](dict(task or {}), seed)
    if source == "stdlib":
        # prepare() reuses a matching store in well under a second and refuses one built from another corpus.
        path = default_store_path(data_dir, "stdlib", tokenizer)
        return StoreDataset(open_store(prepare("stdlib", tokenizer, path, val_fraction=val_fraction, log=log)))
    if storage.is_remote(source):  # read from a local copy, made once
        try:
            return StoreDataset(open_store(storage.local_store(source, log=log or (lambda _: None))), url=source)
        except storage.StorageError as e:
            raise DataError(f"data.source: {e}") from None
    p = Path(source)
    if not p.exists():
        # The store's tokenizer is not data.tokenizer (which only applies to stdlib), so the hint names none.
        raise DataError(f"data.source {source!r} does not exist: give 'stdlib', 'synthetic:<task>' or a token store "
                        f"made by `attnlab data prepare --source FILES --tokenizer byte|bpe:N|tokenizer.json "
                        f"--out {source}`")
    return StoreDataset(open_store(p))


def check_dataset_vocab(ds: Dataset, model_vocab_size: int) -> None:
    if isinstance(ds, StoreDataset):
        check_vocab(ds.store, model_vocab_size)
    elif ds.vocab_size > model_vocab_size:
        raise DataError(f"{ds.description} uses {ds.vocab_size} token ids but model.vocab_size is "
                        f"{model_vocab_size}; set --set model.vocab_size={ds.vocab_size}")
