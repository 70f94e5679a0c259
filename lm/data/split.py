"""The train/val split: by document, chosen by a hash of each document's key.

Rule: rank documents by sha256(key); the lowest-ranked go to val until val holds at least
`val_fraction` of the corpus's UTF-8 bytes (at least one document, never all of them). The choice
needs no seed and does not depend on file order, so val stays a spread of unrelated documents
rather than, say, the last modules in alphabetical order. A corpus of one document (a single .txt
file) cannot be split by document, so its last `val_fraction` of characters, cut at a line start
where there is one, becomes the val document.
"""

from __future__ import annotations

import hashlib
import math

from lm.data.errors import DataError
from lm.data.sources import Document

RULE = "sha256(document key) ranking; lowest-ranked documents to val until val >= val_fraction of the bytes"
SINGLE_DOCUMENT_RULE = "single document: its last val_fraction of characters, from a line start, is val"


def key_rank(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def split(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document], str]:
    """Train and val documents, each in corpus order, and the rule that chose them."""
    if not docs:
        raise DataError("the corpus has no non-empty documents; check that the source files contain text")
    if len(docs) == 1:
        train, val = _split_single(docs[0], val_fraction)
        return [train], [val], SINGLE_DOCUMENT_RULE
    sizes = [len(d.text.encode("utf-8")) for d in docs]
    order = sorted(range(len(docs)), key=lambda i: (key_rank(docs[i].key), i))
    target = val_fraction * sum(sizes)
    val, val_bytes = set(), 0
    for i in order[:-1]:
        if val and val_bytes >= target:
            break
        val.add(i)
        val_bytes += sizes[i]
    train_docs = [d for i, d in enumerate(docs) if i not in val]
    val_docs = [d for i, d in enumerate(docs) if i in val]
    return train_docs, val_docs, RULE


def _split_single(doc: Document, val_fraction: float) -> tuple[Document, Document]:
    text = doc.text
    cut = min(len(text) - 1, math.ceil(len(text) * (1 - val_fraction)))
    line_start = text.find("\n", cut) + 1
    if 0 < line_start < len(text):
        cut = line_start
    if cut <= 0 or cut >= len(text):
        raise DataError(
            f"the corpus is one document of {len(text)} characters, too short to split into train and val; "
            "add text or documents"
        )
    return Document(f"{doc.key}#train", text[:cut]), Document(f"{doc.key}#val", text[cut:])
