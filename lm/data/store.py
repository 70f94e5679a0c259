"""The prepared token store: a directory that holds a tokenized corpus, self-contained.

    meta.json                      what is below, the fingerprints it was made from, token and byte counts; its
                                   "splits" list each split's shards in order
    train/PPPPP-SSSSS.bin          a shard of the train split: documents concatenated with no separator token,
                                   uint16 when vocab_size <= 65536 else uint32 (memory-mapped on read)
    train/PPPPP-SSSSS.offsets.npy  int64 [n_documents + 1]: document d is tokens[offsets[d]:offsets[d+1]]
    val/...                        the same for val
    tokenizer.json                 the trained or loaded tokenizer (absent for "byte")

A split is its shards' tokens one after another (lm/data/sharded.py reads them as one array). Stores of format
version 1 (train.bin, train_doc_offsets.npy: one shard per split) are read as they are.

Document boundaries live in the offsets, not in the token stream, so every token is text and
n_bytes / n_tokens converts a per-token loss into bits per byte exactly.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from pathlib import Path

import numpy as np

from lm.data import sources as sources_lib
from lm.data import tokenizers as tok_lib
from lm.data.errors import DataError, prepare_hint
from lm.data.sharded import Documents, Shard, Tokens

FORMAT = "attnlab.token_store"
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)
SPLITS = ("train", "val")
META = "meta.json"
TOKENIZER_FILE = "tokenizer.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class TokenStore:
    """A read-only view of a prepared store; open it with `open_store`."""

    def __init__(self, path: Path, meta: dict, shards: dict[str, list[Shard]]):
        self.path = path
        self.meta = meta
        self.vocab_size: int = meta["vocab_size"]
        self.dtype = np.dtype(meta["dtype"])
        self._shards = shards
        self._tokens: dict[str, Tokens] = {}
        self._documents: dict[str, Documents] = {}

    @property
    def fingerprint(self) -> str:
        """Identifies the token streams: same source, tokenizer and split rule give the same value."""
        return self.meta["fingerprint"]

    def _split_meta(self, name: str) -> dict:
        if name not in self.meta["splits"]:
            raise DataError(f"token store {self.path} has no split {name!r}; "
                            f"its splits are {', '.join(self.meta['splits'])}")
        return self.meta["splits"][name]

    def split(self, name: str) -> Tokens:
        """The split's tokens, memory-mapped read-only, as one array over its shards."""
        self._split_meta(name)
        if name not in self._tokens:
            self._tokens[name] = Tokens(self._shards[name], self.dtype)
        return self._tokens[name]

    def documents(self, name: str) -> Documents:
        """The split's document index (token bounds of each document), memory-mapped."""
        self._split_meta(name)
        if name not in self._documents:
            self._documents[name] = Documents(self._shards[name])
        return self._documents[name]

    def doc_offsets(self, name: str) -> np.ndarray:
        """int64 [n_documents + 1]: document d is split(name)[offsets[d]:offsets[d + 1]]; built in memory."""
        return self.documents(name).offsets()

    def n_tokens(self, name: str) -> int:
        return self._split_meta(name)["n_tokens"]

    def n_bytes(self, name: str) -> int:
        return self._split_meta(name)["n_bytes"]

    def n_documents(self, name: str) -> int:
        return self._split_meta(name)["n_documents"]

    def tokenizer(self) -> tok_lib.Tokenizer:
        info = self.meta["tokenizer"]
        if info["file"] is None:
            return tok_lib.ByteTokenizer()
        file = self.path / info["file"]
        return tok_lib.from_json(file.read_text(encoding="utf-8"), info["spec"], str(file))

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.n_tokens(s)}" for s in self.meta["splits"])
        return f"TokenStore({str(self.path)!r}, vocab_size={self.vocab_size}, tokens: {counts})"


def is_token_store(path: str | Path) -> bool:
    """Whether `path` is a token store, complete or damaged: a directory whose meta.json names this format.
    Only such a directory may be replaced by `prepare(..., overwrite=True)`."""
    meta_file = Path(path) / META
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def open_store(path: str | Path) -> TokenStore:
    """Open and verify a store: DataError if it is missing, incomplete or does not match its meta.json."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"token store {path} does not exist; create it with `attnlab data prepare --out {path}`")
    meta_file = path / META
    if not meta_file.is_file():
        raise DataError(f"{path} is not a token store (no {META}): give a directory made by `attnlab data prepare`")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a token store: its {META} is not valid JSON ({exc}); give a directory "
                        f"made by `attnlab data prepare`") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path} is not a token store ({META} lacks format={FORMAT!r}); give a directory made by "
                        f"`attnlab data prepare`")
    try:
        hint = prepare_hint(path, meta["source"]["spec"], meta["tokenizer"]["spec"])
    except (KeyError, TypeError):
        hint = prepare_hint(path)
    if meta.get("format_version") not in READS_VERSIONS:
        raise DataError(f"token store {path} has format version {meta.get('format_version')}, this code reads "
                        f"versions {', '.join(map(str, READS_VERSIONS))}; {hint}")
    try:
        return _verified(path, meta, hint)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"token store {path} is corrupted: {META} is missing or has a bad field ({exc!r}); "
                        f"{hint}") from exc


def shard_files(meta: dict, name: str) -> list[dict]:
    """The split's shards as {"tokens", "offsets", "n_tokens", "n_documents"} (file paths relative to the store)."""
    info = meta["splits"][name]
    if meta["format_version"] == 1:
        return [{"tokens": f"{name}.bin", "offsets": f"{name}_doc_offsets.npy", "n_tokens": info["n_tokens"],
                 "n_documents": info["n_documents"]}]
    return info["shards"]


def _verified(path: Path, meta: dict, hint: str) -> TokenStore:
    vocab_size = int(meta["vocab_size"])
    expected = token_dtype(vocab_size)
    if meta["dtype"] != expected.name:
        raise DataError(f"token store {path} is corrupted: {META} says dtype {meta['dtype']}, but vocab_size "
                        f"{vocab_size} is stored as {expected.name}; {hint}")
    if meta["tokenizer"]["file"] is not None and not (path / meta["tokenizer"]["file"]).is_file():
        raise DataError(f"token store {path} is corrupted: {meta['tokenizer']['file']} is missing; {hint}")
    shards = {}
    for name in SPLITS:
        info = meta["splits"][name]
        files = shard_files(meta, name)
        if (sum(f["n_tokens"] for f in files) != info["n_tokens"]
                or sum(f["n_documents"] for f in files) != info["n_documents"]):
            raise DataError(f"token store {path} is corrupted: the {name} shards listed in {META} do not add up to "
                            f"its {info['n_tokens']} tokens and {info['n_documents']} documents; {hint}")
        shards[name] = [_verified_shard(path, f, expected, hint) for f in files]
    return TokenStore(path, meta, shards)


def _verified_shard(path: Path, shard: dict, dtype: np.dtype, hint: str) -> Shard:
    file, n_tokens, n_documents = path / shard["tokens"], shard["n_tokens"], shard["n_documents"]
    if not file.is_file():
        raise DataError(f"token store {path} is corrupted: {shard['tokens']} is missing; {hint}")
    size = file.stat().st_size
    if size % dtype.itemsize:
        raise DataError(f"token store {path} is corrupted: {shard['tokens']} has {size} bytes, not a whole number "
                        f"of {dtype.name} tokens; {hint}")
    if size // dtype.itemsize != n_tokens:
        raise DataError(f"token store {path} is corrupted: {shard['tokens']} has {size // dtype.itemsize} tokens, "
                        f"{META} says {n_tokens}; {hint}")
    try:
        off = np.load(path / shard["offsets"], mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DataError(f"token store {path} is corrupted: {shard['offsets']} is unreadable ({exc}); "
                        f"{hint}") from exc
    if (off.ndim != 1 or off.dtype != np.int64 or len(off) != n_documents + 1 or off[0] != 0
            or off[-1] != n_tokens or np.any(np.diff(off) < 0)):
        raise DataError(f"token store {path} is corrupted: {shard['offsets']} does not describe "
                        f"{n_documents} documents over {n_tokens} tokens; {hint}")
    return Shard(file, off, n_tokens)


def default_store_path(data_dir: str | Path, source: str | list[str], tokenizer: str) -> Path:
    """Where a store for (source, tokenizer) goes when no path is given, e.g. data/stdlib-byte."""
    return Path(data_dir) / f"{_source_slug(source)}-{_tokenizer_slug(tokenizer)}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "_", text).strip("._") or "x"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _source_slug(source: str | list[str]) -> str:
    entries = [str(s) for s in source] if isinstance(source, (list, tuple)) else [str(source)]
    if entries == [sources_lib.STDLIB]:
        return sources_lib.STDLIB
    fixed = [part for part in Path(entries[0]).parts if not glob.has_magic(part)]
    name = Path(*fixed).resolve().stem if fixed else "files"
    more = f"+{len(entries) - 1}" if len(entries) > 1 else ""
    # Two sources with the same file name elsewhere must not share a store: the hash tells them apart.
    return f"{_slug(name)}{more}-{_short_hash(json.dumps(entries))}"


def _tokenizer_slug(tokenizer: str) -> str:
    kind, arg = tok_lib.parse_spec(tokenizer)
    if kind == "byte":
        return "byte"
    if kind == "bpe":
        return f"bpe{arg}"
    return f"{_slug(arg.resolve().parent.name)}-{_short_hash(str(arg.resolve()))}"


def check_vocab(store: TokenStore | str | Path, model_vocab_size: int) -> None:
    """DataError when the model's embedding table cannot hold every token id in the store."""
    store = store if isinstance(store, TokenStore) else open_store(store)
    if model_vocab_size < store.vocab_size:
        raise DataError(
            f"model vocab_size {model_vocab_size} is smaller than the vocab_size {store.vocab_size} of token store "
            f"{store.path} (tokenizer {store.meta['tokenizer']['spec']}); set the model's vocab_size to at least "
            f"{store.vocab_size} or use a smaller tokenizer"
        )
