"""`attnlab report SWEEP_OR_RUN_DIR... [--out DIR] [--baseline VARIANT] [--key eval_loss] [--contrast A:B]
[--wandb MODE]`: write report.md (what ran, the per-variant table, the contrasts, the plots), report.json (per-run
records) and three PNGs into the output directory, and log the table and plots to the sweep's W&B group as a
`report` job when W&B is on.

The output directory defaults to experiments/results/<sweep name>/; with only plain run directories --out is
required. `--wandb auto` logs online when the runs were configured online and an API key is available, and
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
    r.add_argument("dirs", nargs="+", metavar="SWEEP_OR_RUN_DIR",
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
    r.add_argument("--wandb", default="auto", choices=WANDB_MODES,
                   help="auto (default): log to the sweep's W&B group when the runs were online and a W&B key is "
                        "available, else not; offline: an offline W&B run under DIR/wandb; online; disabled")
    r.set_defaults(fn=cmd_report)
    return r


def cmd_report(args) -> int:
    res = make_report(args.dirs, out=args.out, baseline=args.baseline, key=args.key, wandb_mode=args.wandb,
                      command=command_of(args), contrasts=[parse_contrast(c) for c in args.contrast])
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
                                 ("--key", args.key, None), ("--wandb", args.wandb, "auto")):
        if value != default:
            parts += [flag, str(value)]
    for c in getattr(args, "contrast", []):
        parts += ["--contrast", c]
    return shlex.join(parts)


def parse_contrast(text: str) -> tuple[str, str]:
    """'ccgqa:gqa4' -> ('ccgqa', 'gqa4')."""
    a, sep, b = text.partition(":")
    if not sep or not a or not b or ":" in b:
        raise ReportError(f"--contrast {text!r}: write it as VARIANT:REFERENCE, e.g. --contrast ccgqa:gqa4")
    return a, b


def make_report(dirs: list[str | Path], *, out: str | Path | None = None, baseline: str | None = None,
                key: str | None = None, wandb_mode: str = "auto", command: str | None = None,
                contrasts: list[tuple[str, str]] = ()) -> dict:
    """Read the runs of `dirs`, write report.md, report.json and the PNGs, log to W&B per `wandb_mode`. Returns
    the paths written and counts: {markdown, json, plots, out_dir, variants, runs, unfinished, wandb}."""
    from lm.report.collect import collect
    from lm.report.plots import make_plots
    from lm.report.tables import (choose_baseline, contrast_cells, grid_cells, header, markdown_table, notes,
                                  table_cells, variant_rows)

    if wandb_mode not in WANDB_MODES:
        raise ReportError(f"--wandb {wandb_mode}: choose one of {', '.join(WANDB_MODES)}")
    col = collect(dirs)
    key = key or col.metric or "eval_loss"
    if out is None and col.name is None:
        raise ReportError("--out is required when no argument is a sweep directory")
    out_dir = Path(out) if out is not None else RESULTS / col.name
    name = col.name or out_dir.resolve().name
    mode = resolve_wandb_mode(wandb_mode, col.configs)
    base = choose_baseline(col, baseline)
    rows = variant_rows(col, key, base)
    columns, cells = table_cells(rows, key, base)
    command = command or shlex.join(["attnlab", "report", *map(str, dirs)])

    grid = grid_cells(col, rows, key)
    pairs = list(dict.fromkeys([*col.contrasts, *contrasts]))
    contrast = contrast_cells(col, rows, key, pairs)
    plots = make_plots(rows, out_dir, key, base, col.axis)
    titles = {"by_override.png": f"final {key} against the override", "eval_loss_curves.png": "eval over training", "loss_vs_kv_bytes.png": f"final {key} against "
              "decode memory per token", "loss_vs_flops.png": f"final {key} against forward FLOPs per token"}
    text = [f"# Report: {name}\n", *([col.description.strip() + "\n"] if col.description.strip() else []),
            f"Command: `{command}`\n", "## What ran\n", *[f"- {line}" for line in header(col, base, key)], "",
            "## Results\n", *([markdown_table(*grid), ""] if grid else []), markdown_table(columns, cells), "",
            *[n + "\n" for n in notes(col, rows, key, base)],
            *(["## Contrasts\n", markdown_table(*contrast[:2]), "",
               f"Each row: the first variant's {key} minus the second's, seed by seed; the mean [min, max] over the "
               "seeds both have, relative to the second's mean; 'tie' when the range holds 0.\n"] if contrast else []),
            "## Plots\n", *[f"![{titles[f]}]({f})\n" for f in plots],
            "Per-run records (final evals, eval curves, static facts): `report.json`.\n"]
    md = out_dir / "report.md"
    md.write_text("\n".join(text))
    js = out_dir / "report.json"
    js.write_text(json.dumps({
        "name": name, "group": col.group, "baseline": base, "key": key, "command": command,
        "manifests": col.manifests, "runs": col.records, "unfinished": col.unfinished,
        "contrasts": contrast[2] if contrast else [],
        "variants": [{k: v for k, v in r.items() if k != "records"} for r in rows]}, indent=1))
    logged = log_to_wandb(mode, col, name, columns, cells, plots, out_dir, key, base) if mode else None
    return {"markdown": md, "json": js, "plots": plots, "out_dir": out_dir, "variants": len(rows),
            "runs": len(col.records), "unfinished": len(col.unfinished), "wandb": logged}


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
