"""`attnlab report SWEEP_OR_RUN_DIR... [--out DIR] [--baseline VARIANT] [--key eval_loss] [--contrast A:B]
[--only PATTERN --name NAME] [--wandb MODE]`: write report.md (what ran, the per-variant table with paired 95%
intervals, the contrasts, the ranking at half the run, the plots), report.json (per-run records) and the PNGs into
the output directory, and log the table and plots to the sweep's W&B group as a `report` job when W&B is on. `attnlab report --from-json
REPORT_JSON` writes a report again from the records an earlier one kept.

The output directory defaults to experiments/results/<sweep name>/, or experiments/results/exploratory/<sweep
name>/ for a report below the evidence bar (lm/report/evidence.py); with only plain run directories --out is
required. `--only PATTERN` (repeatable) reports part of a sweep: the variants whose names match, and the
contrasts between them; such a report needs its own `--name` (or `--out`) so it never takes the whole sweep's
place. `--wandb auto` logs online when the runs were configured online and an API key is available, and
otherwise not at all; `offline` writes an offline W&B run under the output directory's wandb/.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from lm.report import ReportError

RESULTS = Path("experiments/results")
WANDB_MODES = ("auto", "offline", "online", "disabled")


def add_parser(subparsers):
    """Add the `report` subcommand to an argparse subparsers object; its handler is `cmd_report`."""
    r = subparsers.add_parser("report", help="markdown table, PNG plots and JSON records for a sweep or runs")
    r.add_argument("dirs", nargs="*", metavar="SWEEP_OR_RUN_DIR",
                   help="a sweep directory (holding sweep.json from `attnlab sweep`) or a run directory "
                        "(config.yaml, metrics.jsonl); several are reported together")
    r.add_argument("--out", default=None, metavar="DIR",
                   help="where report.md, report.json and the PNGs go (default: experiments/results/<sweep name>/; "
                        "required for plain run directories)")
    r.add_argument("--baseline", default=None, metavar="VARIANT",
                   help="the variant the others are compared with seed by seed (default: the sweep's baseline, "
                        "else the first variant)")
    r.add_argument("--key", default=None, metavar="METRIC",
                   help="the final eval metric compared (default: the sweep's `metric`, else eval_loss; e.g. "
                        "eval_bpb, eval_acc)")
    r.add_argument("--contrast", action="append", default=[], metavar="VARIANT:REFERENCE",
                   help="also compare VARIANT with REFERENCE seed by seed, in a table of its own (repeatable; "
                        "added to a sweep spec's `contrasts`)")
    r.add_argument("--only", action="append", default=[], metavar="PATTERN",
                   help="only the variants whose names match this shell pattern, e.g. 'share_*' (repeatable); the "
                        "report says which it left out and needs --name or --out")
    r.add_argument("--name", default=None, metavar="NAME",
                   help="the report's name and directory under experiments/results/ (default: the sweep's name)")
    r.add_argument("--from-json", default=None, metavar="REPORT_JSON",
                   help="write a report again from an earlier report.json's per-run records (the runs may be gone): "
                        "this version's statistics, the same 'what ran'; W&B is not logged")
    r.add_argument("--wandb", default="auto", choices=WANDB_MODES,
                   help="auto (default): log to the sweep's W&B group when the runs were online and a W&B key is "
                        "available, else not; offline: an offline W&B run under DIR/wandb; online; disabled")
    r.set_defaults(fn=cmd_report)
    return r


def cmd_report(args) -> int:
    contrasts = [parse_contrast(c) for c in args.contrast]
    if args.from_json and args.dirs:
        raise ReportError("give either run or sweep directories or --from-json REPORT_JSON, not both")
    if args.only and not (args.name or args.out):
        raise ReportError("--only reports part of the runs: give it a --name (or --out) of its own, e.g. "
                          "--name tiny_2m_core, so it does not take the place of the whole sweep's report")
    if args.from_json:
        res = report_from_json(args.from_json, out=args.out, baseline=args.baseline, key=args.key,
                               contrasts=contrasts, only=args.only, name=args.name)
    elif args.dirs:
        res = make_report(args.dirs, out=args.out, baseline=args.baseline, key=args.key, wandb_mode=args.wandb,
                          command=command_of(args), contrasts=contrasts, only=args.only, name=args.name)
    else:
        raise ReportError("give at least one sweep directory (holding sweep.json) or run directory, or "
                          "--from-json REPORT_JSON")
    if res["exploratory"]:
        print("below the evidence bar (see 'Evidence' in the report): an exploratory report, no claim rests on it")
    unfinished = f", {res['unfinished']} unfinished" if res["unfinished"] else ""
    print(f"{res['markdown']}: {res['variants']} variants, {res['runs']} runs{unfinished}; "
          f"{res['json'].name} and {len(res['plots'])} plots beside it")
    if res["wandb"]:
        print(f"W&B: {res['wandb']}")
    return 0


def command_of(args) -> str:
    """The command line that repeats this report."""
    parts = ["attnlab", "report", *args.dirs]
    for flag, value, default in (("--out", args.out, None), ("--baseline", args.baseline, None),
                                 ("--key", args.key, None), ("--name", getattr(args, "name", None), None),
                                 ("--wandb", args.wandb, "auto")):
        if value != default:
            parts += [flag, str(value)]
    for c in getattr(args, "contrast", []):
        parts += ["--contrast", c]
    for p in getattr(args, "only", []):
        parts += ["--only", p]
    return shlex.join(parts)


def parse_contrast(text: str) -> tuple[str, str]:
    """'ccgqa:gqa4' -> ('ccgqa', 'gqa4')."""
    a, sep, b = text.partition(":")
    if not sep or not a or not b or ":" in b:
        raise ReportError(f"--contrast {text!r}: write it as VARIANT:REFERENCE, e.g. --contrast ccgqa:gqa4")
    return a, b


def make_report(dirs: list[str | Path], *, out: str | Path | None = None, baseline: str | None = None,
                key: str | None = None, wandb_mode: str = "auto", command: str | None = None,
                contrasts: list[tuple[str, str]] = (), only: list[str] = (), name: str | None = None) -> dict:
    """Read the runs of `dirs` (only the variants matching a shell pattern of `only`, when given), write report.md,
    report.json and the PNGs, log to W&B per `wandb_mode`. Returns the paths written and counts: {markdown, json,
    plots, out_dir, variants, runs, unfinished, wandb, exploratory}. Without `out`, a report that meets the
    evidence bar goes to experiments/results/<name>/, one below it to experiments/results/exploratory/<name>/
    (`name`: the sweep's unless given)."""
    from lm.report.collect import collect
    from lm.report.tables import header

    if wandb_mode not in WANDB_MODES:
        raise ReportError(f"--wandb {wandb_mode}: choose one of {', '.join(WANDB_MODES)}")
    col = collect(dirs, only=list(only))
    if name:
        col.name = name
    if out is None and col.name is None:
        raise ReportError("--out is required when no argument is a sweep directory")
    mode = resolve_wandb_mode(wandb_mode, col.configs)
    command = command or shlex.join(["attnlab", "report", *map(str, dirs)])
    key = key or col.metric or "eval_loss"
    return write_report(col, out=out, baseline=baseline, key=key, command=command, contrasts=contrasts,
                        what_ran=lambda base: header(col, base, key), wandb_mode=mode)


def report_from_json(path: str | Path, *, out: str | Path | None = None, baseline: str | None = None,
                     key: str | None = None, contrasts: list[tuple[str, str]] = (), only: list[str] = (),
                     name: str | None = None) -> dict:
    """Write the report again from the per-run records of an earlier report.json (the runs themselves need not
    exist any more): the tables and statistics as this version computes them, the plots, and the same 'what ran'.
    Without `out` it goes where make_report would put it (by the evidence bar); an older copy elsewhere under
    experiments/results/ is then for the caller to remove. Returns what make_report returns."""
    from lm.report.collect import collection_from_report, restrict

    path = Path(path)
    col, doc = collection_from_report(path)
    col = restrict(col, list(only))
    if name:
        col.name = name
    from lm.report.tables import part_lines

    what_ran = [ln for ln in doc["what_ran"] if not ln.startswith("Part of the runs:")] + part_lines(col)
    recomputed = f"`attnlab report --from-json {path}`"
    return write_report(col, out=out, baseline=baseline or doc.get("baseline"), key=key or doc.get("key"),
                        command=doc.get("command") or recomputed, contrasts=contrasts,
                        what_ran=lambda base: what_ran, wandb_mode=None, recomputed_by=recomputed)


def write_report(col, *, out: str | Path | None, baseline: str | None, key: str, command: str,
                 contrasts: list[tuple[str, str]], what_ran, wandb_mode: str | None,
                 recomputed_by: str | None = None) -> dict:
    """Judge `col`'s runs and write report.md, report.json and the plots (and log to W&B when `wandb_mode`).
    `what_ran(baseline)` gives the header's lines."""
    from lm.report.evidence import evidence_bar, evidence_lines, ranking_cells, ranking_check, ranking_sentence
    from lm.report.plots import make_plots
    from lm.report.tables import (INTERVALS, choose_baseline, contrast_cells, grid_cells, markdown_table, notes,
                                  provenance, table_cells, tuning_cells, variant_rows)

    base = choose_baseline(col, baseline)
    rows = variant_rows(col, key, base)
    columns, cells = table_cells(rows, key, base)
    grid = grid_cells(col, rows, key)
    pairs = list(dict.fromkeys([*col.contrasts, *contrasts]))
    contrast = contrast_cells(col, rows, key, pairs)
    below = evidence_bar(rows, contrast[2] if contrast else [])
    name = col.name or Path(out).resolve().name
    out_dir = Path(out) if out is not None else (RESULTS / "exploratory" if below else RESULTS) / name
    ranking = ranking_check(rows, key)
    tuning = tuning_cells(col, key)
    plots = make_plots(rows, out_dir, key, base, col.axis)
    titles = {"by_override.png": f"final {key} against the override", "eval_loss_curves.png": "eval over training",
              "loss_vs_kv_bytes.png": f"final {key} against decode memory per token",
              "loss_vs_flops.png": f"final {key} against forward FLOPs per token"}
    judged = sum(1 for r in rows if r["paired"]) + sum(1 for c in (contrast[2] if contrast else []) if c["paired"])
    header_lines = [*what_ran(base), *evidence_lines(below, judged)]
    if recomputed_by:
        header_lines.append(f"Statistics recomputed from the runs' recorded final evals by {recomputed_by} on "
                            f"{provenance()}.")
    text = [f"# Report: {name}\n", *([col.description.strip() + "\n"] if col.description.strip() else []),
            f"Command: `{command}`\n", "## What ran\n", *[f"- {line}" for line in header_lines], "",
            "## Results\n", *([markdown_table(*grid), ""] if grid else []), markdown_table(columns, cells), "",
            *[n + "\n" for n in notes(col, rows, key, base)],
            *(["## Contrasts\n", markdown_table(*contrast[:2]), "",
               f"Each row: the first variant's {key} minus the second's, seed by seed: {INTERVALS}\n"]
              if contrast else []),
            *([f"## Choice of {col.tune['key']}\n", markdown_table(*tuning[:2]), "", tuning[2] + "\n"]
              if tuning else []),
            *(["## Ranking at half the run\n", markdown_table(*ranking_cells(ranking, key)), "",
               ranking_sentence(ranking) + "\n"] if ranking else []),
            "## Plots\n", *[f"![{titles[f]}]({f})\n" for f in plots],
            "Per-run records (final evals, eval curves, static facts): `report.json`.\n"]
    md = out_dir / "report.md"
    md.write_text("\n".join(text))
    js = out_dir / "report.json"
    js.write_text(json.dumps({
        "name": name, "group": col.group, "baseline": base, "key": key, "command": command,
        "description": col.description, "what_ran": list(what_ran(base)), "manifests": col.manifests,
        "configs": col.config_labels, "axis": col.axis, "evidence_bar": {"meets": not below, "below": below},
        "ranking": ranking, "tune": col.tune, "tuning": col.tuning, "runs": col.records,
        "unfinished": col.unfinished, "left_out": col.left_out,
        "contrasts": contrast[2] if contrast else [],
        "variants": [{k: v for k, v in r.items() if k != "records"} for r in rows]}, indent=1))
    logged = log_to_wandb(wandb_mode, col, name, columns, cells, plots, out_dir, key, base) if wandb_mode else None
    return {"markdown": md, "json": js, "plots": plots, "out_dir": out_dir, "variants": len(rows),
            "runs": len(col.records), "unfinished": len(col.unfinished), "wandb": logged, "exploratory": bool(below)}


def resolve_wandb_mode(mode: str, configs: list) -> str | None:
    """The W&B mode to log in, or None for none. auto: online when a run's config says wandb.mode online and an
    API key is available."""
    from lm.tracking import _has_wandb_key

    if mode == "disabled":
        return None
    if mode == "auto":
        return "online" if any(c.wandb.mode == "online" for c in configs) and _has_wandb_key() else None
    if mode == "online" and not _has_wandb_key():
        raise ReportError("--wandb online but no W&B API key was found: set WANDB_API_KEY or run `wandb login`, "
                          "or use --wandb offline")
    return mode


def log_to_wandb(mode: str, col, name: str, columns: list[str], cells: list[list[str]], plots: dict[str, Path],
                 out_dir: Path, key: str, baseline: str) -> str | None:
    """Log the table, a per-run table and the plots as a `report` job in the sweep's W&B group. A W&B failure is
    a warning: the report files are already written. Returns where the run went (its URL or directory)."""
    try:
        import wandb
    except ImportError:
        raise ReportError("wandb is not installed: `pip install wandb`, or use --wandb disabled") from None
    os.environ.setdefault("WANDB_SILENT", "true")
    settings = col.configs[0].wandb
    runs = wandb.Table(columns=["name", "variant", "seed", key, "params", "kv_cache_bytes_per_token",
                                "flops_per_token", "tokens"],
                       data=[[r["name"], r["variant"], r["seed"], r[key], r["params"], r["kv_cache_bytes_per_token"],
                              r["flops_per_token"], r["tokens"]] for r in col.records])
    try:
        run = wandb.init(project=settings.project, entity=settings.entity, group=col.group, job_type="report",
                         name=f"report-{name}", dir=str(out_dir), mode=mode,
                         config={"key": key, "baseline": baseline, "manifests": col.manifests,
                                 "runs": [r["name"] for r in col.records]})
        run.log({"results": wandb.Table(columns=columns, data=cells), "runs": runs,
                 **{Path(f).stem: wandb.Image(str(p)) for f, p in plots.items()}})
        where = run.url if mode == "online" else str(Path(run.dir).parent)
        run.finish()
        return where
    except Exception as e:  # W&B's classes vary; the report itself is on disk either way
        print(f"warning: W&B logging failed ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]})",
              file=sys.stderr)
        return None
