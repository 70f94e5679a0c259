"""The committed reports: every report.json under experiments/results/ outside exploratory/ meets the evidence bar
when its statistics are computed again from its stored records, and every one under exploratory/ carries no claim
because it is below it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lm.report.cli import report_from_json

RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results"
REPORTS = sorted(RESULTS.rglob("report.json"))


def test_there_are_committed_reports():
    assert any("exploratory" not in p.relative_to(RESULTS).parts for p in REPORTS)


@pytest.mark.parametrize("path", REPORTS, ids=lambda p: str(p.relative_to(RESULTS).parent))
def test_a_committed_report_sits_where_its_evidence_puts_it(path, tmp_path):
    doc = json.loads(path.read_text())
    exploratory = "exploratory" in path.relative_to(RESULTS).parts
    assert doc["evidence_bar"]["meets"] is not exploratory, doc["evidence_bar"]
    res = report_from_json(path, out=tmp_path / "again")
    assert res["exploratory"] is exploratory
    if not exploratory:
        again = json.loads(res["json"].read_text())
        assert all(v["n"] >= 5 for v in again["variants"])
        assert [(c["variant"], c["paired"]["n"] >= 5) for c in again["contrasts"]] == \
            [(c["variant"], True) for c in doc["contrasts"]]
