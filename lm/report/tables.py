"""The report's numbers and markdown: one row per variant (static facts, the final metric's mean ± standard
deviation over seeds, the paired difference from the baseline seed by seed, extra eval metrics), and the header
that says what ran."""
from __future__ import annotations

import datetime
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lm.config import Config, n_params_str
from lm.report import ReportError
from lm.report.collect import STANDARD_EVAL, Collection
from lm.report.stats import MIN_SEEDS, PAIRED_COLUMNS, paired, paired_cells, summarize

INTERVALS = (f"its mean (relative to the reference's mean over those seeds), the 95% Student-t interval of that "
             f"mean, which decides the verdict ('tie' when it holds 0), a 95% percentile bootstrap interval beside "
             f"it (never deciding: with few seeds it is too narrow), and the number of seeds (a claim needs "
             f"{MIN_SEEDS}).")
UNITS = {"eval_loss": "nats per token", "eval_bpb": "bits per byte",
         "eval_acc": "argmax accuracy on the scored targets: every next token, or a synthetic task's answers",
         "eval_ppl": "perplexity"}


def choose_baseline(col: Collection, baseline: str | None) -> str:
    """What the others are paired against: `baseline`, else the manifest's, else the first variant. A variant,
    or, for a sweep with an overrides axis, a config label: each variant is then paired with that config's
    variant of the same override (see `baseline_of`)."""
    chosen = baseline or col.baseline or col.variants[0]
    if chosen not in col.variants and not (col.axis and chosen in col.config_labels):
        within = f"; or one of the configs ({', '.join(col.config_labels)})" if col.axis else ""
        raise ReportError(f"baseline {chosen!r} is not among the variants ({', '.join(col.variants)}){within}")
    return chosen


def within_axis(col: Collection, baseline: str) -> bool:
    """True when `baseline` is a config label paired within each override of the sweep's axis."""
    return bool(col.axis) and baseline not in col.variants


def baseline_of(col: Collection, baseline: str, record: dict) -> str:
    """The variant `record` is paired with: `baseline`, or within the axis that config's variant of the record's
    override."""
    if not within_axis(col, baseline):
        return baseline
    return f"{baseline}-{record['axis_label']}"


def variant_rows(col: Collection, key: str, baseline: str) -> list[dict]:
    """Per variant with a finished run (the baseline first, then in the order met): its records, static facts,
    the values of `key` over seeds with mean, sample standard deviation, min and max, its paired difference from
    the baseline (None for the baseline and for variants sharing no seed with it) and its extra metrics' means."""
    if not col.records:
        raise ReportError(f"no run has an eval line yet ({len(col.unfinished)} unfinished); nothing to report")
    lacking = [r["name"] for r in col.records if not _is_number(r.get(key))]
    if lacking:
        have = sorted({k for r in col.records for k, v in r.items()
                       if (k in STANDARD_EVAL or k in r["extra_metrics"]) and _is_number(v)})
        raise ReportError(f"--key {key}: not in the final eval of {', '.join(lacking)} (the runs have: "
                          f"{', '.join(have)})")
    labelled = [{**r, "label": r["variant"]} for r in col.records]
    summary = summarize(labelled, key)
    base_of = {r["variant"]: baseline_of(col, baseline, r) for r in col.records}
    diffs = {}
    for b in dict.fromkeys(base_of.values()):
        diffs.update(paired([r for r in labelled if base_of[r["variant"]] == b], b, key))
    baselines = set(base_of.values())
    order = sorted(summary, key=lambda v: (v not in baselines, col.variants.index(v)))
    rows = []
    for v in order:
        recs = sorted((r for r in col.records if r["variant"] == v), key=lambda r: r["seed"])
        vals = np.asarray(summary[v]["values"], np.float64)
        extras = {}
        for name in dict.fromkeys(k for r in recs for k in r["extra_metrics"]):
            if name != key and "/" not in name:  # per-layer breakdowns stay in report.json
                extras[name] = float(np.mean([r[name] for r in recs if _is_number(r.get(name))]))
        rows.append({
            "variant": v, "baseline": base_of[v], "config_label": recs[0].get("config_label"),
            "axis_label": recs[0].get("axis_label"), "seeds": [r["seed"] for r in recs], "records": recs,
            **{k: summary[v][k] for k in ("params", "kv_cache_bytes_per_token", "state_bytes_per_sequence",
                                          "flops_per_token")},
            "tokens": sorted({r["tokens"] for r in recs}), "seq_len": recs[0]["seq_len"],
            "values": summary[v]["values"], "mean": summary[v]["mean"], "n": summary[v]["n"],
            "std": float(vals.std(ddof=1)) if vals.size > 1 else 0.0, "min": float(vals.min()),
            "max": float(vals.max()), "paired": diffs.get(v), "extras": extras,
        })
    return rows


def table_cells(rows: list[dict], key: str, baseline: str) -> tuple[list[str], list[list[str]]]:
    """(column names, one list of cells per variant): the table, for markdown and for W&B alike."""
    with_state = any(r["state_bytes_per_sequence"] for r in rows)
    extras = list(dict.fromkeys(k for r in rows for k in r["extras"]))
    versus = f"vs {baseline}" + (", same override" if any(r["baseline"] != baseline for r in rows) else "")
    columns = ["variant", "params", "tokens", "KV bytes/token", *(["state bytes/seq"] if with_state else []),
               "FLOPs/token", f"{key} (mean ± std, n)", f"{versus}: {PAIRED_COLUMNS[0]}", *PAIRED_COLUMNS[1:],
               *extras]
    out = []
    for r in rows:
        mean = f"{r['mean']:.4f} ± {r['std']:.4f} (n={r['n']})" if r["n"] > 1 else f"{r['mean']:.4f} (n=1)"
        paired_part = (["baseline", "", "", "", ""] if r["variant"] == r["baseline"] else
                       paired_cells(r["paired"]) if r["paired"] else ["— (no seed in common)", "", "", "", ""])
        out.append([r["variant"], f"{r['params']:,}", "–".join(f"{t:,}" for t in r["tokens"]),
                    f"{r['kv_cache_bytes_per_token']:,}",
                    *([f"{r['state_bytes_per_sequence']:,}"] if with_state else []),
                    n_params_str(r["flops_per_token"]), mean, *paired_part,
                    *(f"{r['extras'][k]:.4g}" if k in r["extras"] else "—" for k in extras)])
    return columns, out


def grid_cells(col: Collection, rows: list[dict], key: str) -> tuple[list[str], list[list[str]]] | None:
    """For a sweep with an overrides axis: one row per config, one column per override, each cell the metric's
    mean ± std over seeds (None without an axis)."""
    if not col.axis or not all(r.get("config_label") and r.get("axis_label") for r in rows):
        return None
    cell = {(r["config_label"], r["axis_label"]): r for r in rows}
    configs = [c for c in (col.config_labels or dict.fromkeys(r["config_label"] for r in rows))
               if any(c == k[0] for k in cell)]
    out = []
    for c in configs:
        out.append([c, *(f"{cell[c, a]['mean']:.4f} ± {cell[c, a]['std']:.4f} ("
                         + ", ".join(f"{v:.3f}" for v in cell[c, a]["values"]) + ")" if (c, a) in cell else "—"
                         for a in col.axis)])
    return [f"{key} by config × override: mean ± std (per seed)", *col.axis], out


def contrast_cells(col: Collection, rows: list[dict], key: str,
                   contrasts: list[tuple[str, str]]) -> tuple[list[str], list[list[str]], list[dict]] | None:
    """The table of `contrasts` (column names, cells, and the numbers for report.json): each (variant, reference)
    pair's difference in `key` seed by seed, with the per-seed values (None when there are no contrasts). Raises
    ReportError for a pair naming a variant the runs do not have; a pair of variants the runs have, one with no
    finished run yet (a sweep in progress), gets a row saying so."""
    if not contrasts:
        return None
    have = {r["variant"] for r in rows}
    for pair in contrasts:
        missing = [v for v in pair if v not in have and v not in col.variants]
        if missing:
            raise ReportError(f"contrast {pair[0]}:{pair[1]}: no finished run of {', '.join(map(repr, missing))} "
                              f"(variants: {', '.join(sorted(have))})")
    labelled = [{**r, "label": r["variant"]} for r in col.records]
    out, data = [], []
    for a, b in contrasts:
        waiting = [v for v in (a, b) if v not in have]
        p = None if waiting else paired([r for r in labelled if r["variant"] in (a, b)], b, key).get(a)
        data.append({"variant": a, "reference": b, "paired": p})
        if p is None:
            why = f"no finished run of {' or '.join(waiting)} yet" if waiting else "no seed in common"
            out.append([f"{a} − {b}", f"— ({why})", "", "", "", "0", ""])
            continue
        out.append([f"{a} − {b}", *paired_cells(p), ", ".join(f"{d:+.4f}" for d in p["diffs"])])
    return ["comparison", f"{key}: {PAIRED_COLUMNS[0]}", *PAIRED_COLUMNS[1:], "per seed"], out, data


def tuning_cells(col: Collection, key: str) -> tuple[list[str], list[list[str]], str] | None:
    """For a `tune` sweep: one row per variant, one column per value tried (the grid, then any tried beyond it by
    `tune.extend`), each cell the tuning run's final `key` ('diverged', '—' while unfinished, blank where the
    variant did not try it), the chosen value marked; and the sentence under the table. None without tuning."""
    if not col.tune:
        return None
    from lm.sweep.spec import format_value

    t = col.tune
    extensions = t.get("extensions") or {}
    values = sorted({*t["values"], *(x for xs in extensions.values() for x in xs)}, key=float) \
        if extensions else list(t["values"])
    by_name = {r["name"]: r for r in col.tuning}
    cells, edges = [], []
    for variant in col.variants:
        row = [variant]
        chosen = t["choices"].get(variant)
        tried = [*t["values"], *extensions.get(variant, [])]
        for x in values:
            rec = by_name.get(f"{variant}-{t['key'].rsplit('.', 1)[-1]}{format_value(x)}-s{t['seed']}", {})
            value = rec.get(key)
            cell = ("" if x not in tried else f"{value:.4f}" if _is_number(value) else
                    "diverged" if str(rec.get("reason", "")).startswith("diverged") else "—")
            row.append(f"**{cell}** (chosen)" if chosen is not None and format_value(chosen) == format_value(x)
                       else cell)
        ends = (tried[0], tried[-1]) if not extensions else (min(tried, key=float), max(tried, key=float))
        if chosen is not None and format_value(chosen) in map(format_value, ends):
            edges.append(variant)
        cells.append(row)
    note = f"Each variant's {t['key']} was chosen by its final {key} on seed {t['seed']} alone, then every seed ran " \
           f"at that value"
    if t.get("extend"):
        note += (f" (a variant whose best was at an end of what it had tried went on past it at the grid's ratio, "
                 f"up to {t['extend']} values beyond each end)")
    if any(r["seed"] == t["seed"] for r in col.records):
        note += (f"; the seed-{t['seed']} run in the tables above is that tuning run, the best of the values it tried, "
                 f"so seed {t['seed']} flatters each variant a little and the paired differences share that bias")
    elif col.records:
        note += f"; seed {t['seed']} is not among the seeds reported, so no reported run took part in the choice"
    note += "."
    if edges:
        note += (f" At the edge of what was tried ({', '.join(edges)}): a value beyond it may be better, so these "
                 f"variants may be under-tuned.")
    return [f"variant: final {key} at {t['key']} =", *map(str, values)], cells, note


def markdown_table(columns: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])


def notes(col: Collection, rows: list[dict], key: str, baseline: str) -> list[str]:
    """The lines under the table: how to read it, and the runs it leaves out or that stopped early."""
    out = [f"{key} is the final eval's ({UNITS.get(key, key)}); ± is the sample standard deviation over seeds. "
           f"'vs {baseline}' is the difference from {baseline} seed by seed (same seed, same data order) over the "
           f"seeds both have: {INTERVALS} KV bytes are the cache per token over all layers in the model's dtype; "
           f"FLOPs are the forward pass's per token at the trained sequence length."]
    if any(r["state_bytes_per_sequence"] for r in rows):
        out.append("State bytes/seq: the fixed-size decode state per sequence (recurrent states, conv windows), "
                   "whatever its length.")
    if any(r["baseline"] != baseline for r in rows):
        example = next((r for r in rows if r["baseline"] != r["variant"]), None)
        out.append(f"Paired within each override: a variant is compared with {baseline}'s variant of the same "
                   f"override" + (f" (e.g. {example['variant']} with {example['baseline']})" if example else "")
                   + ", seed by seed.")
    missing = sorted({r["baseline"] for r in rows} - {r["variant"] for r in rows})
    if missing:
        out.append(f"No paired differences against {', '.join(missing)}: no finished run.")
    if col.unfinished:
        out.append(f"Unfinished, not in the table ({len(col.unfinished)}): "
                   + ", ".join(f"{u['name']} ({u['reason']})" for u in col.unfinished) + ".")
    early = [r for r in col.records if not r["complete"]]
    if early:
        out.append("Stopped before train.steps (their last eval is used): "
                   + ", ".join(f"{r['name']} (step {r['step']} of {r['steps']}, eval at {r['eval_step']})"
                               for r in early) + ".")
    return out


def header(col: Collection, baseline: str, key: str) -> list[str]:
    """'What ran': runs and seeds, the model recipe, data and tokenizer, training budget, eval, machine."""
    cfgs = col.configs
    seeds = sorted({r["seed"] for r in col.records} | {u["seed"] for u in col.unfinished if u["seed"] is not None})
    n_total = len(col.records) + len(col.unfinished)
    where = ("from " + ", ".join(f"`{m}`" for m in col.manifests)) if col.manifests else "plain run directories"
    lines = [f"Runs: {len(col.records)} finished of {n_total}, {len(col.variants)} variants × seeds {seeds}, "
             f"{where}; baseline {baseline}" + (f"; W&B group {col.group}" if col.group else "") + "."]
    lines += part_lines(col)
    model = [("recipe", recipe_of), ("d_model", lambda c: c.model.d_model),
             ("n_layers", lambda c: c.model.n_layers), ("norm", lambda c: c.model.norm),
             ("pos", lambda c: c.model.pos), ("mlp", lambda c: f"{c.model.mlp.kind} {c.model.mlp.hidden}"),
             ("tie_embeddings", lambda c: str(c.model.tie_embeddings).lower()), ("dtype", lambda c: c.model.dtype)]
    lines.append("Model: " + ", ".join(f"{k} {_common(cfgs, f)}" for k, f in model
                                        if any(f(c) is not None for c in cfgs)) + ".")
    lines.append(f"Data: {_common(cfgs, lambda c: shown_path(c.data.source))}, tokenizer "
                 f"{_common(cfgs, lambda c: tokenizer_words(c.data.tokenizer, c.data.source))}; seq_len "
                 f"{_common(cfgs, lambda c: c.data.seq_len)}, batch {_common(cfgs, lambda c: c.data.batch_size)}.")
    lines.append(f"Training: {_common(cfgs, lambda c: c.train.steps)} steps, lr "
                 f"{_common(cfgs, lambda c: f'{c.optim.lr:g}')} {_common(cfgs, lambda c: c.optim.schedule)} "
                 f"(warmup {_common(cfgs, lambda c: c.optim.warmup_steps)}).")
    lines.append(f"Eval: {key} ({UNITS.get(key, key)}) on the held-out split, "
                 f"{_common(cfgs, lambda c: c.train.eval_steps)} batches, at each run's last eval.")
    dates = sorted({r["trained"] for r in col.records})
    lines.append(f"Machine: trained {dates[0]}" + (f" to {dates[-1]}" if len(dates) > 1 else "")
                 + f" (metrics.jsonl times); report made on {provenance()}.")
    return lines


def shown_path(source: str) -> str:
    """A data source as the header shows it: a path inside the directory the report is made from, relative to it
    (runs record their store's absolute path); anything else as it is."""
    p = Path(source)
    if p.is_absolute():
        try:
            return str(p.relative_to(Path.cwd().resolve()))
        except ValueError:
            return source
    return source


def part_lines(col: Collection) -> list[str]:
    """The header's line on the variants a report of part of the runs left out (none for a whole report)."""
    if not col.left_out:
        return []
    return [f"Part of the runs: the variants {', '.join(col.variants)} only; left out {', '.join(col.left_out)} "
            f"(and the contrasts that involve them)."]


def recipe_of(cfg: Config) -> str:
    """The block recipe in a word: 'modern' (RMSNorm, SwiGLU, RoPE or no positions), 'GPT-2' (LayerNorm, GELU,
    learned positions, tied embeddings), else 'custom'."""
    m = cfg.model
    if m.norm == "rmsnorm" and m.mlp.kind == "swiglu" and m.pos in ("rope", "none"):
        return "modern"
    if m.norm == "layernorm" and m.mlp.kind in ("gelu", "gelu_tanh") and m.pos == "learned" and m.tie_embeddings:
        return "GPT-2"
    return "custom"


def provenance() -> str:
    """This machine's CPU, JAX backend, Python and JAX versions, and today's date."""
    import jax

    from lm.flops import cpu_model

    return (f"{cpu_model()}, backend {jax.default_backend()}; python {platform.python_version()}, "
            f"jax {jax.__version__}; {datetime.date.today().isoformat()}")


def tokenizer_words(tokenizer: str, source: str = "") -> str:
    """'byte' -> 'bytes (256 symbols)', 'bpe:8192' -> 'BPE 8192', anything else names a tokenizer file; a
    synthetic task's data is its own token ids, whatever the tokenizer key says."""
    if source.startswith("synthetic:"):
        return "none (the task's own token ids)"
    if tokenizer == "byte":
        return "bytes (256 symbols)"
    if tokenizer.startswith("bpe:"):
        return f"BPE {tokenizer[4:]}"
    return f"file {tokenizer}"


def _common(cfgs: list[Config], get: Callable[[Config], object]) -> str:
    """The value every config shares, or 'varies (a, b)'."""
    values = list(dict.fromkeys(str(get(c)) for c in cfgs))
    return values[0] if len(values) == 1 else f"varies ({', '.join(values)})"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)

