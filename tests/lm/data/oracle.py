"""An in-memory oracle of a token store: every document read at once, split by the sha256 rule, each document
encoded on its own. It is written independently of lm.data's writer, so a store prepared any other way
(streamed, in parallel, sharded, resumed, in parts) can be checked token for token against it."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import zstandard

from lm.data import open_store
from lm.data.tokenizers import byte_level_bpe

BPE_SAMPLE_BYTES = 20 * 2**20


def corpus_documents(files: list[tuple[Path, str]]) -> list[tuple[str, str]]:
    """(key, text) of every non-empty document, in corpus order; `files` are (path, name) in corpus order."""
    docs = []
    for path, name in files:
        if path.suffix == ".txt":
            docs.append((name, path.read_bytes().decode("utf-8", errors="replace")))
        elif path.suffix == ".parquet":
            column = pq.read_table(path, columns=["text"]).column("text").to_pylist()
            docs += [(f"{name}:{row}", text) for row, text in enumerate(column) if text is not None]
        else:
            data = path.read_bytes()
            if path.suffix == ".gz":
                data = gzip.decompress(data)
            elif path.suffix == ".zst":
                data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
            for lineno, line in enumerate(data.decode("utf-8").split("\n"), 1):
                if line.strip():
                    docs.append((f"{name}:{lineno}", json.loads(line)["text"]))
    return [(k, t) for k, t in docs if t]


def _rank(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def split_documents(docs: list[tuple[str, str]], val_fraction: float):
    """(train, val) lists of (key, text) in corpus order."""
    if len(docs) == 1:
        key, text = docs[0]
        cut = min(len(text) - 1, math.ceil(len(text) * (1 - val_fraction)))
        line = text.find("\n", cut) + 1
        cut = line if 0 < line < len(text) else cut
        return [(f"{key}#train", text[:cut])], [(f"{key}#val", text[cut:])]
    sizes = [len(t.encode()) for _, t in docs]
    order = sorted(range(len(docs)), key=lambda i: (_rank(docs[i][0]), i))
    val, val_bytes = set(), 0
    for i in order[:-1]:
        if val and val_bytes >= val_fraction * sum(sizes):
            break
        val.add(i)
        val_bytes += sizes[i]
    return ([d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val])


def bpe_sample(train: list[tuple[str, str]]) -> list[str]:
    """The train documents a bpe:N tokenizer is trained on: lowest sha256 rank first, up to the byte budget."""
    texts, total = [], 0
    for _, text in sorted(train, key=lambda d: _rank(d[0])):
        if total >= BPE_SAMPLE_BYTES:
            break
        texts.append(text)
        total += len(text.encode())
    return texts


def expected_store(docs: list[tuple[str, str]], val_fraction: float, tokenizer) -> dict:
    """{split: (tokens int64, document offsets int64)} for `tokenizer` (anything with .encode)."""
    out = {}
    for name, split_docs in zip(("train", "val"), split_documents(docs, val_fraction)):
        encoded = [np.asarray(tokenizer.encode(text), dtype=np.int64) for _, text in split_docs]
        offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
        out[name] = (np.concatenate(encoded) if encoded else np.zeros(0, np.int64), offsets)
    return out


def assert_store_equals_oracle(store_path, docs: list[tuple[str, str]], val_fraction: float = 0.02) -> None:
    """The store holds exactly the oracle's split of `docs`, tokenized by the store's own tokenizer; a bpe:N
    store's tokenizer is the one trained on the oracle's sample."""
    store = open_store(store_path)
    tok = store.tokenizer()
    spec = store.meta["tokenizer"]["spec"]
    if spec.startswith("bpe:"):
        train, _ = split_documents(docs, val_fraction)
        trained = byte_level_bpe(bpe_sample(train), int(spec.split(":")[1]), spec)
        assert trained.to_json() == tok.to_json(), "the store's BPE was not trained on the oracle's sample"
    for name, (tokens, offsets) in expected_store(docs, val_fraction, tok).items():
        np.testing.assert_array_equal(np.asarray(store.split(name), dtype=np.int64), tokens, err_msg=name)
        np.testing.assert_array_equal(store.doc_offsets(name), offsets, err_msg=name)
        assert store.n_tokens(name) == len(tokens)
        assert store.meta["splits"][name]["n_documents"] == len(offsets) - 1
