"""The train/val split: by document, chosen by a hash of each document's key.

Rule: rank documents by sha256(key); the lowest-ranked go to val until val holds at least
`val_fraction` of the corpus's UTF-8 bytes (at least one document, never all of them). The choice
needs no seed and does not depend on file order, so val stays a spread of unrelated documents
rather than, say, the last modules in alphabetical order. A corpus of one document (a single .txt
file) cannot be split by document, so its last `val_fraction` of characters, cut at a line start
where there is one, becomes the val document.

The rule needs only each document's rank and size, so it streams: one pass over the corpus
(lm/data/scan.py) finds the last val document in rank order, the cut, and every later pass holds out
exactly the documents at or below it. Equal keys (two files of the same name) rank in corpus order.
With a separate validation corpus (`val_source`) there is no hash split: its documents are val, the
source's train.
"""

from __future__ import annotations

import hashlib
import math

from lm.data.errors import DataError

RULE = "sha256(document key) ranking; lowest-ranked documents to val until val >= val_fraction of the bytes"
SINGLE_DOCUMENT_RULE = "single document: its last val_fraction of characters, from a line start, is val"
VAL_SOURCE_RULE = "separate validation corpus: every document of val_source is val, every document of source train"

# Where a document falls in the rank order: (sha256 rank of its key, file index, position in the file).
Order = tuple[int, int, int]


def key_rank(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def val_count(sizes: list[int], n_documents: int, total_bytes: int, val_fraction: float) -> int | None:
    """How many of the lowest-ranked documents are val, given the byte sizes of the lowest-ranked ones in rank
    order (all documents, or the first of them) and the corpus's totals; None when the sizes given end before
    the rule does."""
    target = val_fraction * total_bytes
    count, held = 0, 0
    for size in sizes[:n_documents - 1]:
        if count and held >= target:
            return count
        count, held = count + 1, held + size
    if (count and held >= target) or count == n_documents - 1:
        return count
    return None


def split_single(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val) text of a corpus that is one document."""
    cut = min(len(text) - 1, math.ceil(len(text) * (1 - val_fraction)))
    line_start = text.find("\n", cut) + 1
    if 0 < line_start < len(text):
        cut = line_start
    if cut <= 0 or cut >= len(text):
        raise DataError(
            f"the corpus is one document of {len(text)} characters, too short to split into train and val; "
            "add text or documents"
        )
    return text[:cut], text[cut:]
