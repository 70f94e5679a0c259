"""Whether a report can carry claims, and whether its ranking was settled before the end of training.

The bar: every variant has at least MIN_SEEDS seeds and every paired difference (against the baseline, and each
contrast) has that many seeds in common. A report below it is exploratory: it is written under
experiments/results/exploratory/ and no claim is drawn from it.

The ranking check compares the variants at an eval about half way through training with the final eval: the
order of the means, and each variant's verdict against its baseline. When they differ, a shorter budget would
have ranked the variants differently, so the budget ranks early optimisation speed as much as the variants.
"""
from __future__ import annotations

import numpy as np

from lm.report.stats import MIN_SEEDS, compare, verdict

HIGHER_IS_BETTER = ("eval_acc",)


def evidence_bar(rows: list[dict], contrasts: list[dict]) -> list[str]:
    """Why the report is below the bar (an empty list when it meets it)."""
    short = [f"{r['variant']} (n={r['n']})" for r in rows if r["n"] < MIN_SEEDS]
    unpaired = [f"{r['variant']} vs {r['baseline']} (n={r['paired']['n']})" for r in rows
                if r["paired"] and r["paired"]["n"] < MIN_SEEDS]
    unpaired += [f"{c['variant']} vs {c['reference']} (n={c['paired']['n'] if c['paired'] else 0})"
                 for c in contrasts if not c["paired"] or c["paired"]["n"] < MIN_SEEDS]
    out = []
    if short:
        out.append(f"fewer than {MIN_SEEDS} seeds: {', '.join(short)}")
    if unpaired:
        out.append(f"fewer than {MIN_SEEDS} seeds in common: {', '.join(unpaired)}")
    return out


def evidence_lines(reasons: list[str], n_differences: int) -> list[str]:
    """The report's sentence on the bar, and on how many of its `n_differences` judged differences chance alone
    would call real."""
    chance = (f" Each of the {n_differences} differences judged here is called at the 95% level on its own: were "
              f"none real, about {n_differences / 20:.1f} would still be called by chance." if n_differences else "")
    if not reasons:
        return [f"Evidence: every variant and every paired difference has at least {MIN_SEEDS} seeds; a "
                f"difference is called only where its 95% t-interval excludes 0.{chance}"]
    return [f"Evidence: below the bar ({'; '.join(reasons)}). This report is exploratory: no claim rests on it, "
            f"whatever its intervals say.{chance}"]


def _curve(rec: dict, key: str) -> dict[int, float]:
    points = rec["eval_curve"] if key == "eval_loss" else rec.get("eval_curves", {}).get(key, [])
    return {int(step): float(v) for step, v in points}


def midpoint_step(rows: list[dict], key: str) -> int | None:
    """The eval step nearest half of the runs' last eval that every run logged (None when there is none before
    the last eval, or the runs ended at different steps)."""
    recs = [rec for r in rows for rec in r["records"]]
    ends = {rec["eval_step"] for rec in recs}
    if len(ends) != 1:
        return None
    end = ends.pop()
    common = set.intersection(*(set(_curve(rec, key)) for rec in recs)) - {end}
    return min(common, key=lambda s: (abs(s - end / 2), s)) if common else None


def ranking_check(rows: list[dict], key: str) -> dict | None:
    """The variants at the midpoint eval against the final eval: per variant its mean at both and its rank
    (1 = best) at both, and its verdict against its baseline at both; whether the orders are equal, and Kendall's
    tau between them, over the variants that trained (an inference-time variant has no curve). None with fewer
    than two such variants or no common midpoint eval."""
    rows = [r for r in rows if all(_curve(rec, key) for rec in r["records"])]  # not inference-time variants
    mid = midpoint_step(rows, key) if rows else None
    if mid is None or len(rows) < 2:
        return None
    sign = -1.0 if key in HIGHER_IS_BETTER else 1.0
    by_variant = {r["variant"]: r for r in rows}
    at_mid = {r["variant"]: {rec["seed"]: _curve(rec, key)[mid] for rec in r["records"]} for r in rows}
    means_mid = {v: float(np.mean(list(s.values()))) for v, s in at_mid.items()}
    means_end = {r["variant"]: r["mean"] for r in rows}
    order_mid = sorted(means_mid, key=lambda v: sign * means_mid[v])
    order_end = sorted(means_end, key=lambda v: sign * means_end[v])
    out = []
    for v in order_end:
        base = by_variant[v]["baseline"]
        mid_verdict = None
        if v != base and base in at_mid:
            seeds = sorted(set(at_mid[v]) & set(at_mid[base]))
            if seeds:
                p = compare([at_mid[v][s] - at_mid[base][s] for s in seeds],
                            float(np.mean([at_mid[base][s] for s in seeds])))
                mid_verdict = verdict(p)
        end_p = by_variant[v]["paired"]
        out.append({"variant": v, "mean_mid": means_mid[v], "mean_end": means_end[v],
                    "rank_mid": order_mid.index(v) + 1, "rank_end": order_end.index(v) + 1,
                    "verdict_mid": mid_verdict, "verdict_end": verdict(end_p) if end_p else None})
    from scipy.stats import kendalltau

    tau = kendalltau([order_mid.index(v) for v in order_end], list(range(len(order_end)))).statistic
    end_step = rows[0]["records"][0]["eval_step"]
    return {"step_mid": mid, "step_end": end_step, "same_order": order_mid == order_end,
            "same_verdicts": all(x["verdict_mid"] == x["verdict_end"] for x in out), "kendall_tau": float(tau),
            "variants": out}


def ranking_cells(check: dict, key: str) -> tuple[list[str], list[list[str]]]:
    """The ranking check as a table: one row per variant in the final order."""
    columns = ["variant", f"{key} at step {check['step_mid']}", "rank", f"{key} at step {check['step_end']}",
               "rank", "verdict vs baseline then", "and at the end"]
    cells = [[x["variant"], f"{x['mean_mid']:.4f}", str(x["rank_mid"]), f"{x['mean_end']:.4f}", str(x["rank_end"]),
              x["verdict_mid"] or "—", x["verdict_end"] or "—"] for x in check["variants"]]
    return columns, cells


def ranking_sentence(check: dict) -> str:
    order = "the same order" if check["same_order"] else "a different order"
    verdicts = "the same verdicts" if check["same_verdicts"] else "different verdicts"
    return (f"Ranked by the mean over seeds (best first) at step {check['step_mid']} and at step "
            f"{check['step_end']}: {order} (Kendall's tau {check['kendall_tau']:.2f}) and {verdicts} against the "
            f"baseline. Adjacent ranks may tie: only the intervals above separate two variants.")
