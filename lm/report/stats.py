"""Statistics over seeds of a set of runs: per-variant means and spreads, and paired differences with their 95%
intervals.

Records are dicts with at least `label` (the variant), `seed` and the compared metric (e.g. `eval_loss`);
`summarize` also copies the variant's static facts (params, KV bytes, FLOPs, tokens) from its first record.

A difference is judged by the Student-t 95% interval of the mean of the per-seed differences (same seed, same data
order): the two variants differ when it excludes 0, and tie otherwise, and always with fewer than two seeds. A
sign shared by every seed is not enough: with three seeds a true zero effect gives one 25% of the time. A
percentile bootstrap interval of the same mean stands beside it as a check that does not assume normal
differences; it never decides, because with a handful of seeds it cannot reach past the observed differences and
is too narrow (with 3 seeds only 10 distinct resamples exist). A claim also needs at least `MIN_SEEDS` seeds.
"""
from __future__ import annotations

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95
MIN_SEEDS = 5  # the evidence bar: a claim rests on at least this many seeds
BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed: the same runs give the same report


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


def t_interval(d: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The Student-t interval of the mean of `d` (None for fewer than two values)."""
    if d.size < 2:
        return None
    half = sps.t.ppf(0.5 + confidence / 2, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
    return float(d.mean() - half), float(d.mean() + half)


def bootstrap_interval(d: np.ndarray, confidence: float = CONFIDENCE, samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """The percentile bootstrap interval of the mean of `d`: the mean of `samples` resamples with replacement
    (None for fewer than two values)."""
    if d.size < 2:
        return None
    means = d[np.random.default_rng(seed).integers(0, d.size, (samples, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return float(lo), float(hi)


def compare(d, reference_mean: float) -> dict:
    """The judgement of per-seed differences `d` (variant minus reference): mean, sample standard deviation, the
    t and bootstrap 95% intervals, the range, the count, the mean relative to `reference_mean`, `tie` (the t
    interval holds 0, or there is none) and `enough` (at least MIN_SEEDS seeds)."""
    d = np.asarray(d, np.float64)
    ci, boot = t_interval(d), bootstrap_interval(d)
    return dict(mean=float(d.mean()), sd=float(d.std(ddof=1)) if d.size > 1 else 0.0, n=int(d.size),
                diffs=[float(x) for x in d], ci=ci, boot=boot, lo=float(d.min()), hi=float(d.max()),
                tie=ci is None or ci[0] <= 0 <= ci[1], enough=bool(d.size >= MIN_SEEDS),
                rel=float(d.mean() / reference_mean),
                rel_ci=None if ci is None else (ci[0] / reference_mean, ci[1] / reference_mean))


def paired(records: list[dict], baseline: str, key: str = "eval_loss") -> dict[str, dict]:
    """Per label, its difference from `baseline` seed by seed over the seeds both have, judged by `compare`
    (relative to the baseline's mean over those seeds)."""
    by = {(r["label"], r["seed"]): r[key] for r in records}
    base = {seed: v for (label, seed), v in by.items() if label == baseline}
    out: dict[str, dict] = {}
    for label in dict.fromkeys(r["label"] for r in records):
        seeds = [seed for seed in sorted(base) if (label, seed) in by]
        if label == baseline or not seeds:
            continue
        out[label] = compare([by[(label, s)] - base[s] for s in seeds], float(np.mean([base[s] for s in seeds])))
    return out


def verdict(p: dict, lower: str = "lower", higher: str = "higher") -> str:
    """'tie' when the 95% t-interval holds 0 (or there is none), else `lower` or `higher`."""
    return "tie" if p["tie"] else lower if p["mean"] < 0 else higher


def paired_cells(p: dict) -> list[str]:
    """The cells of one judged difference: '+0.0697 (+3.08%)', the t interval '[+0.0412, +0.0982]', the bootstrap
    interval, the verdict ('lower', 'higher' or 'tie') and the seeds ('3', marked '3 < 5' below the bar)."""
    def interval(iv):
        return "—" if iv is None else f"[{iv[0]:+.4f}, {iv[1]:+.4f}]"

    return [f"{p['mean']:+.4f} ({100 * p['rel']:+.2f}%)", interval(p["ci"]), interval(p["boot"]), verdict(p),
            str(p["n"]) if p["enough"] else f"{p['n']} < {MIN_SEEDS}"]


PAIRED_COLUMNS = ["mean difference (relative)", "95% t-interval", "95% bootstrap", "verdict", "seeds"]
