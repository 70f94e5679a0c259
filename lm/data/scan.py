"""The pass over a corpus that decides, before any token is written, which documents are val and which train
documents a BPE is trained on.

Both are prefixes of the rank order (lm/data/split.py): val is the lowest-ranked documents up to val_fraction of
the corpus's bytes; the BPE sample the next, train, documents up to a byte budget. So the scan keeps only each
document's rank order and size, and of those only the ones that can still fall in a prefix: those ranked below
a cap, lowered as the corpus's total grows, to twice the share the prefixes need. Its memory is then about
2 * (val_fraction + budget / corpus bytes) of one small tuple per document, not the corpus. A corpus whose
prefixes reach past the cap (possible only by chance, with few large documents) is scanned again keeping every
document, so the result never depends on the cap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from lm.data import readers
from lm.data.errors import DataError
from lm.data.split import Order, key_rank, val_count

_FULL = 2**64
# Candidates held before the cap is first lowered; doubled whenever half of them stay below the new cap.
PRUNE_AT = 1 << 18


@dataclass(frozen=True)
class Scan:
    documents: int
    bytes: int
    single: bool  # one document in all: split by characters (split.split_single), not by rank
    val_cut: Order | None  # documents ranked at or below it are val; None: none are (or no hash split)
    sample_cut: Order | None  # train documents ranked above val_cut and at or below it are the BPE sample

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Scan:
        cut = lambda value: tuple(value) if value is not None else None  # noqa: E731
        return cls(data["documents"], data["bytes"], data["single"], cut(data["val_cut"]), cut(data["sample_cut"]))


def scan(read: Callable[[], Iterable[tuple[int, readers.Record]]], *, val_fraction: float | None,
         sample_bytes: int | None, log: Callable[[str], None], prune: bool = True) -> Scan:
    """Scan the records `read()` yields ((file index, record) in corpus order). `val_fraction` None: no hash split
    (every document is train); `sample_bytes` None: no BPE sample."""
    kept: list[tuple[Order, int]] = []
    cap, limit, n, total = _FULL, PRUNE_AT, 0, 0
    for index, record in read():
        if not record.text:
            continue
        rank = key_rank(record.key)
        size = len(record.text.encode("utf-8"))
        n, total = n + 1, total + size
        if rank < cap:
            kept.append(((rank, index, record.pos), size))
        if prune and len(kept) >= limit:
            need = (val_fraction or 0) * total + (sample_bytes or 0)
            cap = min(cap, int(min(1.0, 2 * need / total) * _FULL))
            kept = [k for k in kept if k[0][0] < cap]
            limit = limit * 2 if len(kept) >= limit // 2 else limit
    if n == 0:
        raise DataError("the corpus has no non-empty documents; check that the source files contain text")
    kept = sorted(k for k in kept if k[0][0] < cap)
    result = _cuts(kept, n, total, val_fraction, sample_bytes)
    if result is None:
        log("scanning the corpus again, keeping every document: the low-ranked ones it kept did not reach the "
            "val share and the tokenizer sample")
        return scan(read, val_fraction=val_fraction, sample_bytes=sample_bytes, log=log, prune=False)
    return result


def _cuts(kept: list[tuple[Order, int]], n: int, total: int, val_fraction: float | None,
          sample_bytes: int | None) -> Scan | None:
    complete = len(kept) == n
    single = val_fraction is not None and n == 1
    n_val = 0
    if val_fraction is not None and not single:
        n_val = val_count([size for _, size in kept], n, total, val_fraction)
        if n_val is None:
            return None
    n_sample = 0
    if sample_bytes is not None and not single:
        held = 0
        for _, size in kept[n_val:]:
            if held >= sample_bytes:
                break
            n_sample, held = n_sample + 1, held + size
        if held < sample_bytes and not complete:
            return None
    val_cut = kept[n_val - 1][0] if n_val else None
    sample_cut = kept[n_val + n_sample - 1][0] if n_sample else None
    return Scan(n, total, single, val_cut, sample_cut)
