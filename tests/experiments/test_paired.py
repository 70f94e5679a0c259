"""Paired differences over seeds (lm.report.stats.paired): each variant against the baseline of the same seed,
with the range over seeds, and a range that holds zero called a tie."""
from __future__ import annotations

import pytest

from lm.report.stats import paired, paired_cell


def _records(values: dict[str, list[float]]) -> list[dict]:
    return [dict(label=label, seed=seed, eval_loss=v) for label, vs in values.items() for seed, v in enumerate(vs)]


def test_differences_are_paired_by_seed():
    # Seed 2 is a hard seed for both: unpaired, B's spread (0.5) would swamp its steady -0.1.
    d = paired(_records({"base": [2.0, 2.1, 2.5], "B": [1.9, 2.0, 2.4], "C": [2.05, 2.0, 2.55]}), "base")
    assert set(d) == {"B", "C"}
    assert d["B"]["mean"] == pytest.approx(-0.1) and d["B"]["lo"] == pytest.approx(-0.1)
    assert d["B"]["hi"] == pytest.approx(-0.1) and d["B"]["n"] == 3 and not d["B"]["tie"]
    assert d["C"]["tie"] and d["C"]["lo"] == pytest.approx(-0.1) and d["C"]["hi"] == pytest.approx(0.05)
    assert d["B"]["rel"] == pytest.approx(-0.1 / 2.2)
    assert paired_cell(d["B"]).startswith("-0.1000 [-0.1000, -0.1000] (-4.55%)")
    assert paired_cell(d["C"]).endswith(" tie")


def test_a_seed_missing_for_a_variant_is_left_out():
    d = paired(_records({"base": [2.0, 2.1], "B": [1.9]}), "base")
    assert d["B"]["n"] == 1 and d["B"]["mean"] == pytest.approx(-0.1)
