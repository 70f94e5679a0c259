"""The evidence bar (>= 5 seeds, or the report is exploratory), the ranking at half the run against the end, and
a report written again from an earlier report.json's records."""
from __future__ import annotations

import json

import pytest

from lm.report import ReportError
from lm.report.cli import make_report, report_from_json
from lm.report.evidence import evidence_bar, ranking_check
from tests.report.fakes import write_run, write_sweep


def _row(variant, values, mids, baseline="a", paired=None):
    recs = [{"seed": s, "eval_step": 100, "eval_curve": [[50, m], [100, v]]} for s, (v, m) in
            enumerate(zip(values, mids))]
    return {"variant": variant, "baseline": baseline, "records": recs, "n": len(values),
            "mean": sum(values) / len(values), "paired": paired}


def test_the_bar_needs_five_seeds_for_every_variant_and_difference():
    five = {"n": 5}
    assert evidence_bar([{"variant": "a", "n": 5, "baseline": "a", "paired": None},
                         {"variant": "b", "n": 5, "baseline": "a", "paired": five}], []) == []
    below = evidence_bar([{"variant": "a", "n": 5, "baseline": "a", "paired": None},
                          {"variant": "b", "n": 4, "baseline": "a", "paired": {"n": 4}}],
                         [{"variant": "b", "reference": "a", "paired": None}])
    assert below == ["fewer than 5 seeds: b (n=4)", "fewer than 5 seeds in common: b vs a (n=4), b vs a (n=0)"]


def test_the_ranking_at_half_the_run_against_the_end():
    """At step 50 b is ahead of c; at the end c is ahead of b: the order differs, tau 1/3 over three variants."""
    rows = [_row("a", [2.0] * 3, [3.0] * 3), _row("b", [2.2, 2.21, 2.19], [2.5, 2.51, 2.49]),
            _row("c", [2.1, 2.11, 2.09], [3.5, 3.51, 3.49])]
    from lm.report.stats import paired

    recs = [{"label": r["variant"], "seed": x["seed"], "eval_loss": x["eval_curve"][-1][1]} for r in rows
            for x in r["records"]]
    for r, p in paired(recs, "a").items():
        next(row for row in rows if row["variant"] == r)["paired"] = p
    check = ranking_check(rows, "eval_loss")
    assert check["step_mid"] == 50 and check["step_end"] == 100 and not check["same_order"]
    by = {x["variant"]: x for x in check["variants"]}
    assert [x["variant"] for x in check["variants"]] == ["a", "c", "b"]
    assert (by["b"]["rank_mid"], by["b"]["rank_end"]) == (1, 3) and (by["c"]["rank_mid"], by["c"]["rank_end"]) == (3, 2)
    assert by["b"]["verdict_mid"] == "lower" and by["b"]["verdict_end"] == "higher" and not check["same_verdicts"]
    assert check["kendall_tau"] == pytest.approx(-1 / 3)
    # Higher is better for accuracy: the order reverses.
    for r in rows:
        for x in r["records"]:
            x["eval_curves"] = {"eval_acc": x["eval_curve"]}
    assert [x["variant"] for x in ranking_check(rows, "eval_acc")["variants"]] == ["b", "c", "a"]
    # Only a final eval: nothing to compare.
    for r in rows:
        for x in r["records"]:
            x["eval_curve"] = x["eval_curve"][-1:]
    assert ranking_check(rows, "eval_loss") is None


def test_a_report_meeting_the_bar_goes_to_results(tmp_path, monkeypatch):
    """Five seeds of two variants, b below a by 0.1 +- 0.01: the report meets the bar, is written under
    experiments/results/<name>/ and calls b lower; it names the ranking at step 50."""
    dirs = [write_run(tmp_path / "runs", v, s, 2.0 + 0.01 * s - (0.1 + 0.002 * s if v == "gqa4" else 0.0))
            for v in ("softmax", "gqa4") for s in range(5)]
    sweep = tmp_path / "sweeps" / "five"
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"name": "five", "baseline": "softmax", "runs": [
        {"name": d.name, "variant": d.name.rsplit("-s", 1)[0], "seed": int(d.name.rsplit("-s", 1)[1]),
         "run_dir": str(d), "status": "finished"} for d in dirs]}))
    monkeypatch.chdir(tmp_path)
    res = make_report([sweep], wandb_mode="disabled")
    assert not res["exploratory"] and res["out_dir"].as_posix() == "experiments/results/five"
    md = res["markdown"].read_text()
    assert "Evidence: every variant and every paired difference has at least 5 seeds" in md
    assert "Each of the 1 differences judged here is called at the 95% level on its own: were none real, about " \
           "0.1 would still be called by chance." in md
    assert "| lower | 5 |" in md and "## Ranking at half the run" in md
    assert json.loads(res["json"].read_text())["evidence_bar"] == {"meets": True, "below": []}


def test_a_report_written_again_from_its_json(tmp_path):
    """The records of report.json stand in for the runs: the same tables, the same 'what ran', a line saying the
    statistics were recomputed; an older report.json without stored headers takes them from its report.md."""
    first = make_report([write_sweep(tmp_path)], out=tmp_path / "first", wandb_mode="disabled")
    again = report_from_json(first["json"], out=tmp_path / "again")
    md1, md2 = first["markdown"].read_text(), again["markdown"].read_text()
    table = lambda md: [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert table(md1) == table(md2) and again["exploratory"]
    what_ran = json.loads(first["json"].read_text())["what_ran"]
    assert what_ran == json.loads(again["json"].read_text())["what_ran"] and all(f"- {w}" in md2 for w in what_ran)
    assert "Statistics recomputed from the runs' recorded final evals by `attnlab report --from-json" in md2
    assert "A test sweep." in md2
    old = json.loads(first["json"].read_text())
    for k in ("what_ran", "description"):
        del old[k]
    (tmp_path / "first" / "report.json").write_text(json.dumps(old))
    third = report_from_json(tmp_path / "first" / "report.json", out=tmp_path / "third")
    assert json.loads(third["json"].read_text())["what_ran"] == what_ran
    assert table(third["markdown"].read_text()) == table(md1)
    for bad, message in [(tmp_path / "none.json", "no such file"), (first["markdown"], "cannot be read as JSON")]:
        with pytest.raises(ReportError, match=message):
            report_from_json(bad, out=tmp_path / "x")


def test_a_tuned_sweep_reports_its_choice_per_variant(tmp_path):
    """The tuning runs are a table of their own (the chosen value marked, a diverged run named, a choice at the
    grid's edge flagged) and stay out of the main table; seed 0 of each variant is its chosen tuning run."""
    values, tags = [0.001, 0.002, 0.004], ["lr0.001", "lr0.002", "lr0.004"]
    finals = {"softmax": [2.3, 2.0, 2.1], "mqa": [1.9, 2.2, None]}  # mqa at 0.004 diverged
    runs = []
    for variant, fs in finals.items():
        for tag, final in zip(tags, fs):
            d = write_run(tmp_path / "tune" / tag, variant, 0, final if final is not None else 9.0)
            runs.append({"name": f"{variant}-{tag}-s0", "variant": f"{variant}-{tag}", "seed": 0, "run_dir": str(d),
                         "stage": "tune", "status": "finished" if final is not None else "diverged"})
    chosen = {"softmax": "lr0.002", "mqa": "lr0.001"}
    for variant in finals:
        runs.append({"name": f"{variant}-s0", "variant": variant, "seed": 0, "stage": "main", "status": "finished",
                     "reuses": f"{variant}-{chosen[variant]}-s0",
                     "run_dir": str(tmp_path / "tune" / chosen[variant] / f"{variant}-s0")})
        d = write_run(tmp_path / "main", variant, 1, finals[variant][tags.index(chosen[variant])] + 0.05)
        runs.append({"name": f"{variant}-s1", "variant": variant, "seed": 1, "stage": "main", "status": "finished",
                     "run_dir": str(d)})
    sweep = tmp_path / "sweeps" / "tuned"
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"name": "tuned", "baseline": "softmax", "runs": runs, "tune": {
        "key": "optim.lr", "values": values, "seed": 0, "choices": {"softmax": 0.002, "mqa": 0.001}}}))
    res = make_report([sweep], out=tmp_path / "out", wandb_mode="disabled")
    md = res["markdown"].read_text()
    assert "## Choice of optim.lr" in md
    assert "| softmax | 2.3000 | **2.0000** (chosen) | 2.1000 |" in md
    assert "| mqa | **1.9000** (chosen) | 2.2000 | diverged |" in md
    assert "At the edge of what was tried (mqa)" in md
    table = [ln.split("|")[1].strip() for ln in md.split("## Results")[1].split("##")[0].splitlines()
             if ln.startswith("| ")]
    assert table == ["variant", "softmax", "mqa"]
    assert _row_values(md, "mqa") == "1.9250"  # seeds 0 (its tuning run, 1.9) and 1 (1.95)
    doc = json.loads(res["json"].read_text())
    assert doc["tune"]["choices"] == {"softmax": 0.002, "mqa": 0.001} and len(doc["tuning"]) == 6
    assert "so seed 0 flatters each variant a little" in md
    # Reported seeds without the tuning seed: the note says no reported run took part in the choice.
    held_out = [r for r in runs if not (r["stage"] == "main" and r["seed"] == 0)]
    (sweep / "sweep.json").write_text(json.dumps({**json.loads((sweep / "sweep.json").read_text()),
                                                  "runs": held_out}))
    md = make_report([sweep], out=tmp_path / "out2", wandb_mode="disabled")["markdown"].read_text()
    assert "seed 0 is not among the seeds reported, so no reported run took part in the choice" in md
    assert "flatters" not in md and _row_values(md, "mqa") == "1.9500"


def _row_values(md: str, variant: str) -> str:
    line = next(ln for ln in md.split("## Results")[1].splitlines() if ln.startswith(f"| {variant} |"))
    return line.split("|")[6].strip().split(" ")[0]
