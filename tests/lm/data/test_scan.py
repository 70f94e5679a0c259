"""The split's rule in its streaming form: the val count from sizes in rank order, and the scan's cuts."""

import numpy as np

from lm.data import readers
from lm.data.scan import _cuts, scan
from lm.data.split import key_rank, val_count

from .oracle import split_documents


def test_val_count_is_the_oracle_rule():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 40))
        docs = [(f"k{trial}-{i}", "x" * int(rng.integers(1, 500))) for i in range(n)]
        fraction = float(rng.choice([0.01, 0.1, 0.5, 0.9]))
        _, val = split_documents(docs, fraction)
        ranked = sorted(docs, key=lambda d: key_rank(d[0]))
        sizes = [len(t) for _, t in ranked]
        assert val_count(sizes, n, sum(sizes), fraction) == len(val)
        # A prefix of the ranking that holds the val documents is enough; one that stops short is not.
        assert val_count(sizes[:len(val)], n, sum(sizes), fraction) in (len(val), None)
        if len(val) < n - 1:
            assert val_count(sizes[:len(val) - 1], n, sum(sizes), fraction) is None


def test_cuts_of_a_prefix_that_ends_too_soon_ask_for_a_full_scan():
    kept = [((i, 0, i), 10) for i in range(5)]  # the 5 lowest-ranked of 100 documents of 10 bytes
    assert _cuts(kept, 100, 1000, 0.02, None).val_cut == (1, 0, 1)  # 2 documents hold 2%
    assert _cuts(kept, 100, 1000, 0.2, None) is None  # 20% needs 20 documents
    assert _cuts(kept, 100, 1000, 0.02, 25).sample_cut == (4, 0, 4)  # 3 more reach 25 bytes
    assert _cuts(kept, 100, 1000, 0.02, 40) is None
    assert _cuts(kept, 5, 50, 0.02, 10**6).sample_cut == (4, 0, 4)  # every document kept: the sample is the rest


def test_a_scan_whose_cap_fell_short_scans_again_with_every_document(monkeypatch):
    """Documents that pass the cap by chance too rarely: the first pass cannot tell val, the second can."""
    from lm.data import scan as scan_lib

    sizes = [1] * 300 + [10_000]  # the one big document decides the 2% of the bytes
    records = [(0, readers.Record(i + 1, f"doc{i}", "x" * size, False)) for i, size in enumerate(sizes)]
    monkeypatch.setattr(scan_lib, "PRUNE_AT", 8)
    messages = []
    pruned = scan(lambda: iter(records), val_fraction=0.02, sample_bytes=None, log=messages.append)
    full = scan(lambda: iter(records), val_fraction=0.02, sample_bytes=None, log=None, prune=False)
    assert messages and messages[0].startswith("scanning the corpus again, keeping every document")
    assert pruned == full and pruned.val_cut is not None
    assert pruned.documents == 301 and pruned.bytes == 10_300
