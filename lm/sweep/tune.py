"""Choosing each variant's value of a `tune` sweep (lm/sweep/spec.py) from its tuning runs.

A variant's value is chosen once every one of its tuning runs has ended (finished or diverged): the value whose
run's final eval is best by the sweep's metric (lowest, or highest for accuracy). A diverged run, or one whose
final eval is not finite, counts as worst. A variant whose tuning runs all diverged gets no value, and its runs
for the other seeds never start. A run counts as finished when the manifest says so, or when its metrics.jsonl
has an eval at its last step (runs a cluster trained, which do not write the manifest).

With `tune.extend`, a variant whose best value so far is the largest (smallest) it tried, while it may still try
one beyond that end, is not decided: it tries that value next (`Tune.beyond`), and is decided once those runs
have ended too. Everything here follows from the runs on disk, so a rerun of the sweep resumes where it stood.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from lm.sweep.spec import Sweep, with_choices, with_extensions


def trial_outcomes(sweep: Sweep, statuses: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per variant, per tried value (as its run-name tag): the final metric of a finished tuning run, "diverged",
    or None while the run has not ended."""
    steps = {r.name: r.cfg.train.steps for r in sweep.runs if r.stage == "tune"}
    out: dict[str, dict[str, Any]] = {}
    for v in sweep.variants:
        out[v.label] = {}
        for x in sweep.tried(v.label):
            run = f"{v.label}-{sweep.tune.tag(x)}-s{sweep.tune.seed}"
            status = statuses.get(run)
            evals = _evals(Path(sweep.sweep_dir) / run)
            finished = status == "finished" or (status != "diverged" and evals and evals[-1]["step"] >= steps[run])
            out[v.label][sweep.tune.tag(x)] = ("diverged" if status == "diverged" else
                                               final_metric(evals, sweep.metric) if finished else None)
    return out


def _evals(run_dir: Path) -> list[dict]:
    from lm.report.collect import read_metrics_lines

    path = run_dir / "metrics.jsonl"
    return [r for r in read_metrics_lines(path) if "eval_loss" in r] if path.is_file() else []


def final_metric(evals: list[dict], key: str) -> float:
    """The last eval's `key` (inf when missing or not finite)."""
    value = evals[-1].get(key) if evals else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


def choose(sweep: Sweep, statuses: dict[str, str]) -> dict[str, Any]:
    """variant -> the chosen value, for the variants whose tuning runs have all ended and not all diverged (and,
    with `tune.extend`, whose best is not at an end they may still try past)."""
    return _plan(sweep, statuses)[0]


def _plan(sweep: Sweep, statuses: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(variant -> the chosen value, variant -> the next value to try beyond the grid) for `sweep`'s tried values."""
    from lm.report.evidence import HIGHER_IS_BETTER

    sign = -1.0 if sweep.metric in HIGHER_IS_BETTER else 1.0
    chosen, more = {}, {}
    for variant, outcomes in trial_outcomes(sweep, statuses).items():
        if any(o is None for o in outcomes.values()):
            continue
        tried = sweep.tried(variant)
        by_tag = {sweep.tune.tag(x): x for x in tried}
        scored = {tag: sign * o if math.isfinite(o) else math.inf for tag, o in outcomes.items() if o != "diverged"}
        finite = {tag: s for tag, s in scored.items() if math.isfinite(s)}
        if not finite:
            continue
        best = by_tag[min(finite, key=lambda t: (finite[t], list(by_tag).index(t)))]
        at_end = [up for up, end in ((True, max(tried)), (False, min(tried))) if best == end]
        beyond = sweep.tune.beyond(tried, at_end[0]) if at_end and sweep.tune.extend else None
        if beyond is None:
            chosen[variant] = best
        else:
            more[variant] = beyond
    return chosen, more


def resolved(sweep: Sweep, statuses: dict[str, str]) -> Sweep:
    """`sweep` with the tuning runs each variant tries beyond the grid so far (`tune.extend`) and the runs of
    every variant whose value can be chosen now (unchanged without `tune`)."""
    if not sweep.tune:
        return sweep
    # From the sweep as loaded: the values beyond the grid are found again from the runs on disk.
    grid = {f"{v.label}-{sweep.tune.tag(x)}-s{sweep.tune.seed}" for v in sweep.variants for x in sweep.tune.values}
    base = dataclasses.replace(sweep, runs=tuple(r for r in sweep.runs if r.name in grid), choices={}, extensions={})
    extensions: dict[str, tuple[Any, ...]] = {}
    while True:
        chosen, more = _plan(with_extensions(base, extensions), statuses)
        if not more:
            break
        for variant, value in more.items():  # its run may have ended already (a resumed sweep): plan again
            extensions[variant] = (*extensions.get(variant, ()), value)
    return with_choices(with_extensions(base, extensions), chosen)


__all__ = ["choose", "resolved", "trial_outcomes", "final_metric"]
