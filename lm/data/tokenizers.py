"""Tokenizers: raw UTF-8 bytes, or a Hugging Face `tokenizers` model (trained here or loaded).

A tokenizer spec is one of
  "byte"                  the 256 byte values, no special tokens;
  "bpe:N"                 a byte-level BPE with N tokens, trained on the train split at prepare time;
  "path/to/tokenizer.json" a Hugging Face tokenizer file.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers as hf

from lm.data.errors import DataError

BYTE_VOCAB = 256

_BPE_SPEC = re.compile(r"bpe:(\d+)")


class Tokenizer:
    """Text <-> token ids. `spec` is the string the tokenizer was asked for."""

    spec: str
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode many documents at once; prepare uses this path for speed."""
        raise NotImplementedError

    def to_json(self) -> str | None:
        """The file a token store keeps so it can rebuild this tokenizer, or None if none is needed."""
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256((self.to_json() or self.spec).encode()).hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    spec = "byte"
    vocab_size = BYTE_VOCAB

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        # A model's vocab may be padded past 256; ids it should never emit still decode, as U+FFFD.
        invalid = (ids < 0) | (ids >= BYTE_VOCAB)
        if not invalid.any():
            return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
        pieces, start = [], 0
        for bad in np.flatnonzero(invalid):
            pieces.append(ids[start:bad].astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
            pieces.append("\ufffd")
            start = bad + 1
        pieces.append(ids[start:].astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
        return "".join(pieces)

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def to_json(self) -> None:
        return None


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer; encoding never adds special tokens, so token counts match the text."""

    def __init__(self, tokenizer: hf.Tokenizer, spec: str):
        self._tok = tokenizer
        self.spec = spec
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        # encode_batch_fast (tokenizers >= 0.21) skips offset tracking, which prepare never needs.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [np.asarray(e.ids, dtype=np.int64) for e in encode(list(texts), add_special_tokens=False)]

    def to_json(self) -> str:
        return self._tok.to_str()


def parse_spec(spec: str) -> tuple[str, int | Path | None]:
    """("byte", None) | ("bpe", vocab_size) | ("file", path); DataError for anything else."""
    if not isinstance(spec, str) or not spec:
        raise DataError(f"tokenizer spec {spec!r} is not a string; use 'byte', 'bpe:N' or a path to a tokenizer.json")
    if spec == "byte":
        return "byte", None
    if spec.startswith("bpe:"):
        match = _BPE_SPEC.fullmatch(spec)
        if match is None:
            raise DataError(f"tokenizer spec {spec!r} is malformed; write bpe:N with N an integer, e.g. bpe:8192")
        vocab_size = int(match.group(1))
        if not BYTE_VOCAB < vocab_size < 2**32:
            raise DataError(
                f"tokenizer spec {spec!r} asks for {vocab_size} tokens; a byte-level BPE needs more than "
                f"{BYTE_VOCAB} (its byte alphabet), e.g. bpe:8192"
            )
        return "bpe", vocab_size
    path = Path(spec)
    if not path.is_file():
        raise DataError(
            f"tokenizer {spec!r} is not 'byte', 'bpe:N' or an existing tokenizer.json file; "
            "check the path or pick one of those"
        )
    return "file", path


def byte_level_bpe(texts: Iterable[str], vocab_size: int, spec: str) -> HFTokenizer:
    """Train a GPT-2-style byte-level BPE: every string is encodable, so no unknown token is needed."""
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, spec)


def from_json(text: str, spec: str, origin: str) -> HFTokenizer:
    try:
        return HFTokenizer(hf.Tokenizer.from_str(text), spec)
    except Exception as exc:  # the Rust side raises a bare Exception for malformed files
        raise DataError(f"{origin} is not a valid Hugging Face tokenizer file ({exc}); "
                        "point to a tokenizer.json") from exc


def read_tokenizer_file(path: Path) -> str:
    """The text of a tokenizer.json; DataError when it cannot be read or is not UTF-8 text (a binary file)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read tokenizer file {path}: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not a JSON tokenizer file (byte {exc.start} is not UTF-8 text: it looks like a "
                        "binary file); point --tokenizer to a Hugging Face tokenizer.json") from None


def load(spec: str) -> Tokenizer:
    """A tokenizer that needs no training: "byte" or a tokenizer.json path."""
    kind, arg = parse_spec(spec)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "file":
        return from_json(read_tokenizer_file(arg), spec, str(arg))
    raise DataError(f"tokenizer {spec!r} must be trained on a corpus; run `attnlab data prepare` with it first")
