"""Statistics over seeds of a set of runs: per-variant means and spreads, and paired differences against a baseline.

Records are dicts with at least `label` (the variant), `seed` and the compared metric (e.g. `eval_loss`);
`summarize` also copies the variant's static facts (params, KV bytes, FLOPs, tokens) from its first record.
"""
from __future__ import annotations

import numpy as np


def summarize(records: list[dict], key: str = "eval_loss") -> dict[str, dict]:
    """Per label: mean, spread (max - min) and count of `key` over seeds, plus the label's static facts."""
    out: dict[str, dict] = {}
    for rec in records:
        out.setdefault(rec["label"], {"values": [], **{k: rec[k] for k in (
            "params", "kv_cache_bytes_per_token", "state_bytes_per_sequence", "flops_per_token", "tokens")}})
        out[rec["label"]]["values"].append(rec[key])
    for s in out.values():
        v = np.asarray(s["values"], np.float64)
        s.update(mean=float(v.mean()), spread=float(v.max() - v.min()), n=len(v))
    return out


def paired(records: list[dict], baseline: str, key: str = "eval_loss") -> dict[str, dict]:
    """Per label, its difference from `baseline` seed by seed (same seed, same data order): the mean, the
    range over seeds and the count, and whether the range holds 0 (a tie: the seeds disagree on the sign)."""
    by = {(r["label"], r["seed"]): r[key] for r in records}
    base = {seed: v for (label, seed), v in by.items() if label == baseline}
    out: dict[str, dict] = {}
    for label in dict.fromkeys(r["label"] for r in records):
        d = np.asarray([by[(label, seed)] - base[seed] for seed in sorted(base) if (label, seed) in by], np.float64)
        if label == baseline or not d.size:
            continue
        out[label] = dict(mean=float(d.mean()), lo=float(d.min()), hi=float(d.max()), n=int(d.size),
                          diffs=[float(x) for x in d],
                          tie=bool(d.min() <= 0 <= d.max()), rel=float(d.mean() / np.mean(list(base.values()))))
    return out


def paired_cell(p: dict) -> str:
    """'−0.0123 [−0.0150, −0.0101] (−0.45%)', or the same marked 'tie' when the seeds disagree on the sign."""
    cell = f"{p['mean']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}] ({100 * p['rel']:+.2f}%)"
    return cell + (" tie" if p["tie"] else "")
