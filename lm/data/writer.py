"""Writing a token store: tokenize a corpus, split it, and move the finished store into place.

A store is written into a temporary sibling directory and renamed to its path only when complete
(meta.json last), so a reader never sees a half-written one, and a crash leaves nothing at the path. A write
that fails for lack of space or permission removes the temporary directory and raises DataError saying why.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from lm.data import sources as sources_lib
from lm.data import tokenizers as tok_lib
from lm.data.errors import DataError
from lm.data.split import key_rank, split
from lm.data.store import FORMAT, FORMAT_VERSION, META, TOKENIZER_FILE, is_token_store, open_store, token_dtype

# Bounds BPE training time (about 6 s for the 10 MB stdlib corpus on 2 cores); larger corpora train on a
# deterministic sample of their train documents.
BPE_TRAIN_MAX_BYTES = 20 * 2**20
BPE_RECIPE = (f"byte-level BPE, GPT-2 pre-tokenizer, no special tokens, trained on up to {BPE_TRAIN_MAX_BYTES} "
              "bytes of train documents taken in sha256(key) order")
_ENCODE_CHUNK_BYTES = 8 * 2**20


def prepare(source: str | list[str], tokenizer: str, out: str | Path, *, overwrite: bool = False,
            val_fraction: float = 0.02, log=print) -> Path:
    """Tokenize `source` into a token store at `out`; reuse a complete store made from the same inputs."""
    out = Path(out)
    log = log or (lambda message: None)
    started = time.perf_counter()
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}; e.g. 0.02")
    kind, arg = tok_lib.parse_spec(tokenizer)
    src = sources_lib.resolve(source)
    request = {
        "format_version": FORMAT_VERSION,
        "source_fingerprint": src.fingerprint,
        "tokenizer": _tokenizer_request(kind, arg),
        "val_fraction": float(val_fraction),
    }
    if _existing_store_matches(out, request, overwrite, source, tokenizer):
        log(f"reusing token store {out} (same source and tokenizer)")
        return out

    docs, stats = sources_lib.read_documents(src)
    n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    log(f"source {_describe(src.spec)}: {stats['files']} files, {stats['documents']} documents, "
        f"{n_bytes / 1e6:.1f} MB (fingerprint {src.fingerprint[:12]})"
        + (f"; {stats['empty_skipped']} empty documents skipped" if stats["empty_skipped"] else "")
        + (f"; {stats['not_utf8']} files were not UTF-8, bad bytes became U+FFFD" if stats["not_utf8"] else ""))
    train_docs, val_docs, rule = split(docs, val_fraction)
    tok = _build_tokenizer(kind, arg, tokenizer, train_docs, log)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise _write_error(exc, out, None) or exc
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished store should read like any other directory
        split_meta = {name: _write_split(tmp, name, split_docs, tok)
                      for name, split_docs in (("train", train_docs), ("val", val_docs))}
        tok_json = tok.to_json()
        if tok_json is not None:
            _write_file(tmp / TOKENIZER_FILE, tok_json.encode("utf-8"))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fingerprint": hashlib.sha256(
                f"{src.fingerprint}/{tok.fingerprint}/{rule}/{float(val_fraction)}".encode()).hexdigest(),
            "vocab_size": tok.vocab_size,
            "dtype": token_dtype(tok.vocab_size).name,
            "request": request,
            "source": {"spec": src.spec, "fingerprint": src.fingerprint, **stats, **src.info},
            "tokenizer": {
                "spec": tokenizer,
                "fingerprint": tok.fingerprint,
                "file": TOKENIZER_FILE if tok_json is not None else None,
                "recipe": BPE_RECIPE if kind == "bpe" else None,
            },
            "split": {"rule": rule, "val_fraction": float(val_fraction)},
            "splits": split_meta,
        }
        _write_file(tmp / META, json.dumps(meta, indent=2).encode("utf-8"))
        _install(tmp, out, request, overwrite)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        error = _write_error(exc, out, tmp) if isinstance(exc, OSError) else None
        if error is not None:
            raise error from exc
        raise
    log(f"wrote token store {out}: vocab {tok.vocab_size}, "
        + ", ".join(f"{name} {m['n_tokens']:,} tokens / {m['n_documents']} documents / {m['n_bytes'] / 1e6:.2f} MB"
                    for name, m in split_meta.items())
        + f" in {time.perf_counter() - started:.1f} s")
    return out


# Write failures the user can act on (space, quota, permissions); other OSErrors propagate as they are.
_WRITE_ERRNOS = {
    errno.ENOSPC: ("no space left on device", "free space"),
    errno.EDQUOT: ("disk quota exceeded", "free space"),
    errno.EROFS: ("read-only file system", "choose a writable --out"),
    errno.EACCES: ("permission denied", "choose a writable --out"),
    errno.EPERM: ("operation not permitted", "choose a writable --out"),
}


def _write_error(exc: OSError, out: Path, tmp: Path | None) -> DataError | None:
    """DataError for a storage failure while writing the store at `out` (`tmp`: the temporary directory,
    already removed), or None for any other error."""
    if exc.errno not in _WRITE_ERRNOS:
        return None
    reason, advice = _WRITE_ERRNOS[exc.errno]
    where = f" ({exc.filename})" if exc.filename else ""
    left = "nothing was left behind" if tmp is None or not tmp.exists() else f"remove {tmp}"
    return DataError(f"could not write token store {out}: {reason} ({errno.errorcode[exc.errno]}){where}; "
                     f"{advice} and run prepare again ({left})")


def _describe(spec) -> str:
    return spec if isinstance(spec, str) else f"{spec[0]} (+{len(spec) - 1} more)"


def _tokenizer_request(kind: str, arg) -> str:
    """What decides the tokenizer before it exists: its recipe, or the loaded file's bytes."""
    if kind == "byte":
        return "byte"
    if kind == "bpe":
        return f"bpe:{arg} | {BPE_RECIPE}"
    return "file sha256:" + hashlib.sha256(arg.read_bytes()).hexdigest()


def _existing_store_matches(out: Path, request: dict, overwrite: bool, source, tokenizer) -> bool:
    """True when `out` already holds the store asked for; False when it may be written (absent, empty, or a
    token store to replace with overwrite). Anything that is not a token store is never replaced."""
    if not out.exists():
        return False
    if out.is_dir() and not any(out.iterdir()):
        return False
    if not is_token_store(out):
        what = "a file" if not out.is_dir() else f"a directory that is not a token store (no {META} of one)"
        raise DataError(f"{out} is {what}; prepare writes only to a new path, an empty directory or a token store "
                        f"(which --overwrite replaces): choose another --out")
    try:
        store = open_store(out)
    except DataError as exc:
        if overwrite:
            return False
        raise DataError(f"{out} is a damaged token store ({exc}); pass --overwrite to rebuild it") from exc
    if store.meta["request"] == request:
        return True
    if overwrite:
        return False
    old = store.meta
    raise DataError(
        f"{out} already holds a token store for source {_describe(old['source']['spec'])} / tokenizer "
        f"{old['tokenizer']['spec']} (val_fraction {old['split']['val_fraction']}, source fingerprint "
        f"{old['source']['fingerprint'][:12]}), not for {_describe(source)} / {tokenizer} (fingerprint "
        f"{request['source_fingerprint'][:12]}); choose another --out or pass --overwrite to replace it"
    )


def _build_tokenizer(kind, arg, spec, train_docs, log) -> tok_lib.Tokenizer:
    if kind != "bpe":
        return tok_lib.load(spec)
    texts, total = [], 0
    for doc in sorted(train_docs, key=lambda d: key_rank(d.key)):
        if total >= BPE_TRAIN_MAX_BYTES:
            break
        texts.append(doc.text)
        total += len(doc.text.encode("utf-8"))
    started = time.perf_counter()
    tok = tok_lib.byte_level_bpe(texts, arg, spec)
    log(f"trained {spec} on {total / 1e6:.1f} MB of train text in {time.perf_counter() - started:.1f} s "
        f"(vocab {tok.vocab_size})")
    return tok


def _write_split(directory: Path, name: str, docs: list, tok: tok_lib.Tokenizer) -> dict:
    dtype = token_dtype(tok.vocab_size)
    lengths, counts, n_bytes = [], np.zeros(tok.vocab_size, dtype=np.int64), 0
    with open(directory / f"{name}.bin", "wb") as fh:
        for chunk in _chunks(docs):
            texts = [d.text for d in chunk]
            n_bytes += sum(len(t.encode("utf-8")) for t in texts)
            arrays = tok.encode_arrays(texts)
            ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= tok.vocab_size):
                raise DataError(f"tokenizer {tok.spec} produced id {int(ids.max())} outside its vocab of "
                                f"{tok.vocab_size}; the tokenizer file is inconsistent, use another one")
            counts += np.bincount(ids, minlength=tok.vocab_size)
            lengths.extend(len(a) for a in arrays)
            fh.write(ids.astype(dtype).tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    with open(directory / f"{name}_doc_offsets.npy", "wb") as fh:
        np.save(fh, offsets)
    n_tokens = int(offsets[-1])
    if n_tokens == 0:
        raise DataError(f"the {name} split tokenized to 0 tokens; the corpus has no text, add documents")
    p = counts[counts > 0] / n_tokens
    return {
        "n_tokens": n_tokens,
        "n_bytes": n_bytes,
        "n_documents": len(docs),
        # A model that learned only token frequencies reaches this loss; report it beside eval loss.
        "unigram_entropy_bits_per_token": round(float(-(p * np.log2(p)).sum()), 6),
    }


def _chunks(docs: list):
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc.text)
        if size >= _ENCODE_CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _install(tmp: Path, out: Path, request: dict, overwrite: bool) -> None:
    """Move the finished store into place; the target path only ever holds a complete store."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    try:
        os.rename(tmp, out)
        return
    except OSError:
        if not out.exists():
            raise
    if not overwrite:
        # Another process (e.g. a second host) finished a store here while this one was being written.
        try:
            same = open_store(out).meta["request"] == request
        except DataError:
            same = False
        if not same:
            raise DataError(f"{out} was created by another process during prepare and holds a different store; "
                            "choose another --out or pass --overwrite")
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / "store")
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
