"""The report's PNGs, drawn from `tables.variant_rows`: eval loss over training per variant, and the final metric
against the model's decode memory and forward FLOPs per token.

Figures are made with matplotlib's object API (no pyplot state, the Agg canvas), without a timestamp or
version in the PNG metadata, so the same runs give the same files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lm.report.tables import UNITS

CURVES = "eval_loss_curves.png"
GRID = "by_override.png"
KV = "loss_vs_kv_bytes.png"
FLOPS = "loss_vs_flops.png"


def make_plots(rows: list[dict], out_dir: Path, key: str, baseline: str, axis: list[str] = ()) -> dict[str, Path]:
    """Write the PNGs into `out_dir` (with an overrides axis, also the metric against it); returns {name: path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = {GRID: by_override(rows, out_dir / GRID, key, list(axis))} if axis and all(
        r.get("config_label") and r.get("axis_label") for r in rows) else {}
    return {**grid, CURVES: eval_curves(rows, out_dir / CURVES, key),
            KV: against(rows, out_dir / KV, key, baseline, memory_per_token,
                        "decode memory per token, bytes: KV cache (+ fixed state / seq_len, hollow markers)"),
            FLOPS: against(rows, out_dir / FLOPS, key, baseline, lambda r: r["flops_per_token"],
                           "forward FLOPs per token")}


def memory_per_token(row: dict) -> float:
    """KV-cache bytes per token, plus the fixed decode state spread over the trained sequence length: a linear or
    recurrent mixer (0 KV bytes) lands at its state's cost per token of a full-length sequence."""
    return row["kv_cache_bytes_per_token"] + row["state_bytes_per_sequence"] / row["seq_len"]


def by_override(rows: list[dict], path: Path, key: str, axis: list[str]) -> Path:
    """The final `key` against the overrides axis (in the spec's order), one line per config: the mean over
    seeds, error bars from the lowest to the highest seed."""
    fig, ax = _figure()
    configs = list(dict.fromkeys(r["config_label"] for r in rows))
    for i, c in enumerate(configs):
        mine = {r["axis_label"]: r for r in rows if r["config_label"] == c}
        xs = [j for j, a in enumerate(axis) if a in mine]
        pts = [mine[axis[j]] for j in xs]
        ax.errorbar(xs, [r["mean"] for r in pts], yerr=[[r["mean"] - r["min"] for r in pts],
                                                         [r["max"] - r["mean"] for r in pts]],
                    marker="o", capsize=3, color=_color(i), label=f"{c} (n={max(r['n'] for r in pts)})")
    ax.set_xticks(range(len(axis)), axis)
    return _finish(fig, ax, path, "override", f"final {key} ({UNITS.get(key, key)})",
                   f"Final {key} per config and override (mean over seeds, bars min–max)")


def eval_curves(rows: list[dict], path: Path, key: str = "eval_loss") -> Path:
    """`key` against step per variant (eval loss when a run kept no curve of `key`): the mean over seeds, and a
    band from the lowest to the highest seed."""
    recs = [rec for row in rows for rec in row["records"]]
    if not all(rec.get("eval_curves", {}).get(key) for rec in recs):
        key = "eval_loss"
    fig, ax = _figure()
    for i, row in enumerate(rows):
        by_step: dict[int, list[float]] = {}
        for rec in row["records"]:
            for step, value in rec["eval_curves"][key] if key != "eval_loss" else rec["eval_curve"]:
                by_step.setdefault(step, []).append(value)
        steps = sorted(by_step)
        vals = [np.asarray(by_step[s], np.float64) for s in steps]
        color = _color(i)
        ax.plot(steps, [v.mean() for v in vals], marker="o", markersize=3, color=color,
                label=f"{row['variant']} (n={row['n']})")
        if row["n"] > 1:
            ax.fill_between(steps, [v.min() for v in vals], [v.max() for v in vals], color=color, alpha=0.2,
                            linewidth=0)
    return _finish(fig, ax, path, "step", f"{key} ({UNITS.get(key, key)})",
                   f"{key} over training: mean over seeds, band min–max")


def against(rows: list[dict], path: Path, key: str, baseline: str, x_of, xlabel: str) -> Path:
    """The final `key` per variant (mean, error bars from the lowest to the highest seed) against `x_of(row)`, on a
    log axis when the x values span a factor of 10 or more. A dashed line marks the baseline's mean."""
    fig, ax = _figure()
    xs = np.asarray([x_of(r) for r in rows], np.float64)
    for i, (row, x) in enumerate(zip(rows, xs)):
        stateful = row["state_bytes_per_sequence"] > 0 and path.name == KV
        ax.errorbar([x], [row["mean"]], yerr=[[row["mean"] - row["min"]], [row["max"] - row["mean"]]], fmt="o",
                    color=_color(i), capsize=3, markersize=6, markerfacecolor="none" if stateful else _color(i))
        ax.annotate(row["variant"], (x, row["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
        if row["variant"] == row.get("baseline", baseline):
            ax.axhline(row["mean"], color="gray", linestyle="--", linewidth=0.8)
    if xs.min() > 0 and xs.max() / xs.min() >= 10:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        # Minor ticks labelled at 2x and 5x each power of ten only, so labels do not run into each other.
        ax.xaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** np.floor(np.log10(v))) in (2, 5) else ""))
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(f"final {key} ({UNITS.get(key, key)})")
    ax.set_title(f"Final {key} per variant (bars: min–max over seeds; dashed: {baseline})", fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    return fig, fig.subplots()


def _color(i: int):
    from matplotlib import colormaps

    return colormaps["tab10"](i % 10)


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Labels, title, legend and grid of a line plot, then the PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return path
