"""Tokenizing batches of documents in worker processes, results in submission order, memory bounded.

One worker tokenizes in the calling process, single-threaded like every worker (the tokenizer's own thread pool
would spin on both cores while this process reads and decompresses: 2.3x the CPU for a slower run). N > 1 workers are N spawned processes (spawn, not fork: the caller
may be a training process with threads), each single-threaded, so N workers use N cores. At most two batches
per worker are in flight, so memory depends on the workers and the batch size, never on the corpus.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

from lm.data import tokenizers as tok_lib
from lm.data.errors import DataError
from lm.data.store import token_dtype

_IN_FLIGHT_PER_WORKER = 2
_PARALLELISM = "TOKENIZERS_PARALLELISM"  # read by Hugging Face tokenizers at each batch call

_worker_tokenizer: tok_lib.Tokenizer | None = None


def _start_worker(tok_json: str | None, spec: str) -> None:
    global _worker_tokenizer
    os.environ[_PARALLELISM] = "false"  # one core per worker: the pool is the parallelism
    _worker_tokenizer = tok_lib.ByteTokenizer() if tok_json is None else tok_lib.from_json(tok_json, spec, spec)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode(_worker_tokenizer, texts)


def encode(tok: tok_lib.Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The batch's tokens, concatenated in the store's dtype, and each document's token count."""
    arrays = tok.encode_arrays(texts)
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    ids = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= tok.vocab_size):
        raise DataError(f"tokenizer {tok.spec} produced id {int(ids.max())} outside its vocab of {tok.vocab_size}; "
                        "the tokenizer file is inconsistent, use another one")
    return ids.astype(token_dtype(tok.vocab_size)), lengths


class Encoder:
    """`with Encoder(tok, workers) as enc: for tag, tokens in enc.map(batches): ...`"""

    def __init__(self, tok: tok_lib.Tokenizer, workers: int):
        self.tok, self.workers = tok, workers
        self._pool = None
        self._caller_parallelism: str | None = None

    def __enter__(self) -> Encoder:
        if self.workers > 1:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"),
                                             initializer=_start_worker, initargs=(self.tok.to_json(), self.tok.spec))
        else:
            self._caller_parallelism = os.environ.get(_PARALLELISM)
            os.environ[_PARALLELISM] = "false"
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        elif self._caller_parallelism is None:
            os.environ.pop(_PARALLELISM, None)
        else:
            os.environ[_PARALLELISM] = self._caller_parallelism

    def map(self, batches: Iterable[tuple[object, list[str]]]) -> Iterator[tuple[object, list[np.ndarray]]]:
        """(tag, texts) -> (tag, one token array per text), in order."""
        if self._pool is None:
            for tag, texts in batches:
                yield tag, _per_document(*encode(self.tok, texts))
            return
        pending = collections.deque()
        for tag, texts in batches:
            pending.append((tag, self._pool.submit(_encode_in_worker, texts)))
            if len(pending) >= _IN_FLIGHT_PER_WORKER * self.workers:
                tag_done, future = pending.popleft()
                yield tag_done, _per_document(*future.result())
        while pending:
            tag_done, future = pending.popleft()
            yield tag_done, _per_document(*future.result())


def _per_document(ids: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(ids, np.cumsum(lengths)[:-1]) if len(lengths) else []
