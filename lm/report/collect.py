"""Reading the runs a report covers: sweep manifests (`sweep.json`, written by `attnlab sweep`) and plain run
directories (config.yaml and metrics.jsonl, see lm/train/rundir.py).

A sweep manifest is {"name", "group", "baseline", "description", "spec", "seeds", "runs": [{"name", "variant",
"seed", "config", "overrides", "run_dir", "status", "config_label", "axis_label"}], "configs", "axis"} (the
config labels and the overrides axis's labels; older manifests lack the last four), and "contrasts" (pairs of
variants the report also compares; optional). A `tune` sweep's manifest adds "tune" ({key, values, seed,
choices}); its tuning runs say "stage": "tune" and are kept apart (Collection.tuning), and the runs of a variant
whose value is not chosen yet say "waiting". A plain run directory's variant is its name without a
trailing `-s<digits>`, its seed the config's run.seed.

Each run with an eval line in its metrics.jsonl becomes one record: the last eval line's metrics, the metrics a
mixer logged at that step beyond the loss (e.g. SP-KV density), the eval curve, the steps reached, and the
model's static facts from `lm.info.model_info`. The others, the runs a manifest says diverged, and a manifest's
runs short of train.steps that it does not call finished (still training, or stopped and not yet resumed) are
listed as unfinished, with the reason. A plain run directory short of train.steps is a run stopped early: its
last eval is used, and the report says so.
"""
from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import json
import re
from pathlib import Path

from lm.config import Config, ConfigError, load_config
from lm.report import ReportError

MANIFEST = "sweep.json"
# What every eval line holds; anything else logged at the final eval step is an extra metric of the run.
STANDARD_EVAL = ("eval_loss", "eval_ppl", "eval_acc", "eval_tokens", "eval_bpb")
FACTS = ("params", "kv_cache_bytes_per_token", "state_bytes_per_sequence", "flops_per_token")


@dataclasses.dataclass
class RunRef:
    """One run to read: where it is and what it is called."""
    name: str
    variant: str
    seed: int | None  # None: the config's run.seed
    run_dir: Path | None  # None: a manifest's run that has no directory yet
    config: str | None = None  # the config file the run was made from (a manifest's), else its config.yaml
    overrides: list[str] = dataclasses.field(default_factory=list)
    status: str | None = None  # the manifest's word on the run
    config_label: str | None = None  # a manifest's config label and overrides-axis label for the run
    axis_label: str | None = None
    stage: str = "main"  # "tune": a tuning run of a `tune` sweep (reported in its own table)
    waiting: bool = False  # a run of a `tune` sweep whose value is not chosen yet
    result: Path | None = None  # an inference-time variant's record (lm/sweep/evals.py); run_dir is its source's


@dataclasses.dataclass
class Collection:
    """Everything read: the finished runs' records, the unfinished runs, and what the manifests say."""
    name: str | None  # the first manifest's sweep name (else its directory's); None for plain run directories
    group: str | None  # the W&B group: the first manifest's, else the runs' wandb.group when they share one
    baseline: str | None  # the first manifest's baseline
    description: str
    manifests: list[str]
    records: list[dict]
    unfinished: list[dict]
    configs: list[Config]  # the config of every run that has one, finished or not
    variants: list[str]  # every variant, finished or not, in the order first met
    config_labels: list[str] = dataclasses.field(default_factory=list)  # the first manifest's configs and its
    axis: list[str] = dataclasses.field(default_factory=list)  # overrides axis (empty: none, or no manifest)
    metric: str | None = None  # the first manifest's metric
    contrasts: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # the manifests' (variant, reference)
    tune: dict | None = None  # the first manifest's tuning settings and choices: {key, values, seed, choices}
    tuning: list[dict] = dataclasses.field(default_factory=list)  # its tuning runs' records (reason: unfinished)
    left_out: list[str] = dataclasses.field(default_factory=list)  # variants `only` left out, in the order met


def matches(variant: str, only: list[str]) -> bool:
    """Whether `variant` is kept by the shell patterns `only` (every variant when there are none)."""
    return not only or any(fnmatch.fnmatchcase(variant, p) for p in only)


def owner(variant: str, variants: list[str]) -> str:
    """The variant a tuning run belongs to: its variant is the tuned one's name, '-' and the value
    ('share_kv-lr0.004' -> 'share_kv'); a name no variant prefixes is its own."""
    return max((v for v in variants if variant.startswith(v + "-")), key=len, default=variant)


def kept_variants(variants: list[str], only: list[str]) -> list[str]:
    """The `variants` matching a pattern of `only`; ReportError when none does."""
    kept = [v for v in variants if matches(v, only)]
    if not kept:
        raise ReportError(f"--only {' '.join(only)}: no variant matches (the variants: {', '.join(variants)})")
    return kept


def restrict(col: Collection, only: list[str]) -> Collection:
    """`col` with only the variants matching a pattern of `only` (their runs, tuning runs and the contrasts whose
    two sides are both kept); ReportError when no variant matches."""
    if not only:
        return col
    kept = kept_variants(col.variants, only)
    keep = lambda recs: [r for r in recs if owner(r["variant"], col.variants) in kept]
    return dataclasses.replace(
        col, records=keep(col.records), unfinished=keep(col.unfinished), tuning=keep(col.tuning), variants=kept,
        contrasts=[c for c in col.contrasts if c[0] in kept and c[1] in kept],
        left_out=[*col.left_out, *(v for v in col.variants if v not in kept)])


def variant_of(run_dir_name: str) -> str:
    """'softmax-s2' -> 'softmax': a run directory's name without its trailing seed."""
    return re.sub(r"-s\d+$", "", run_dir_name)


def collect(paths: list[str | Path], only: list[str] = ()) -> Collection:
    """Read every sweep directory or run directory in `paths` (only the variants matching a shell pattern of
    `only`, when given); raises ReportError on input that names no runs."""
    if not paths:
        raise ReportError("give at least one sweep directory (holding sweep.json) or run directory")
    refs: list[RunRef] = []
    meta: list[dict] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ReportError(f"{p}: no such directory")
        if (p / MANIFEST).is_file():
            manifest = read_manifest(p / MANIFEST)
            meta.append({**manifest, "path": str(p / MANIFEST)})
            refs += manifest_runs(p, manifest)
        elif (p / "config.yaml").is_file():
            refs.append(RunRef(name=p.name, variant=variant_of(p.name), seed=None, run_dir=p,
                               config=str(p / "config.yaml")))
        else:
            raise ReportError(f"{p}: neither a sweep directory (no {MANIFEST}) nor a run directory (no config.yaml)")
    every = list(dict.fromkeys(r.variant for r in refs if r.stage != "tune"))
    kept = kept_variants(every, only) if only else every
    refs = [r for r in refs if (owner(r.variant, every) if r.stage == "tune" else r.variant) in kept]
    records, unfinished, configs, seen, tuning = [], [], [], {}, []
    cache: dict[str, dict] = {}
    for ref in refs:
        rec, cfg = read_run(ref, cache)
        if ref.stage == "tune":
            tuning.append(rec)
            continue
        if cfg is not None:
            configs.append(cfg)
        if rec.get("reason"):
            unfinished.append(rec)
            continue
        where = seen.setdefault((rec["variant"], rec["seed"]), rec["run_dir"])
        if where != rec["run_dir"]:
            raise ReportError(f"{where} and {rec['run_dir']} are both variant {rec['variant']!r} seed {rec['seed']}; "
                              f"report them separately")
        records.append(rec)
    groups = {c.wandb.group for c in configs}
    first = meta[0] if meta else {}
    return Collection(
        name=(first.get("name") or Path(first["path"]).parent.name) if meta else None,
        group=first.get("group") or (groups.pop() if len(groups) == 1 else None),
        baseline=next((m["baseline"] for m in meta if m.get("baseline")), None),
        description=first.get("description") or "", manifests=[m["path"] for m in meta],
        records=records, unfinished=unfinished, configs=configs,
        variants=list(dict.fromkeys(r.variant for r in refs if r.stage != "tune")),
        config_labels=list(first.get("configs") or []), axis=list(first.get("axis") or []),
        metric=first.get("metric"),
        contrasts=list(dict.fromkeys(tuple(c) for m in meta for c in m.get("contrasts") or []
                                     if not only or (c[0] in kept and c[1] in kept))),
        tune=first.get("tune"), tuning=tuning, left_out=[v for v in every if v not in kept])


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot be read ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("runs"), list):
        raise ReportError(f"{path}: not a sweep manifest (no list of runs under \"runs\")")
    for i, run in enumerate(manifest["runs"]):
        missing = [k for k in ("name", "variant", "run_dir") if not isinstance(run, dict) or k not in run]
        if missing:
            raise ReportError(f"{path}: runs[{i}] has no {', '.join(missing)}")
    return manifest


def manifest_runs(sweep_dir: Path, manifest: dict) -> list[RunRef]:
    """The runs a manifest lists. A relative run_dir is looked for from the current directory, then from the
    sweep directory; a run whose directory is in neither place has not started."""
    refs = []
    for run in manifest["runs"]:
        given = Path(run["run_dir"])
        candidates = [given] if given.is_absolute() else [given, sweep_dir / given, sweep_dir / run["name"]]
        run_dir = next((c for c in candidates if c.is_dir()), None)
        seed = run.get("seed")
        refs.append(RunRef(name=run["name"], variant=run["variant"], seed=None if seed is None else int(seed),
                           run_dir=run_dir, config=run.get("config"), overrides=list(run.get("overrides") or []),
                           status=run.get("status"), config_label=run.get("config_label"),
                           axis_label=run.get("axis_label"), stage=run.get("stage") or "main",
                           waiting=bool(run.get("waiting"))))
    for ev in manifest.get("evals") or []:
        given, result = Path(ev["run_dir"]), Path(ev["result"])
        run_dir = next((c for c in ([given] if given.is_absolute() else [given, sweep_dir / given.name])
                        if c.is_dir()), None)
        found = next((c for c in ([result] if result.is_absolute() else [result, sweep_dir / "evals" / result.name])
                      if c.is_file()), sweep_dir / "evals" / result.name)
        refs.append(RunRef(name=ev["name"], variant=ev["variant"], seed=int(ev["seed"]), run_dir=run_dir,
                           result=found))
    return refs


def read_metrics_lines(path: Path) -> list[dict]:
    """metrics.jsonl's records. A last line that does not parse is a write in progress and is left out; any other
    bad line is a ReportError."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    rows = []
    for i, ln in enumerate(lines):
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ReportError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from None
    return rows


def extra_metrics(rows: list[dict], step: int) -> dict:
    """Scalar metrics logged at the eval of `step` beyond the standard ones (e.g. SP-KV density), whether in the
    eval line or in a line of their own at that step."""
    keep = {}
    for x in rows:
        if x.get("step") != step or ("loss" in x and "eval_loss" not in x):
            continue
        keep.update({k: v for k, v in x.items() if k != "step" and k not in STANDARD_EVAL})
    return keep


def read_run(ref: RunRef, cache: dict[str, dict]) -> tuple[dict, Config | None]:
    """(the run's record, its config). A run without an eval line gets a record with a `reason` instead of
    metrics. `cache` maps a model config to its static facts, shared between the seeds of a variant."""
    base = {"name": ref.name, "variant": ref.variant, "seed": ref.seed, "config_label": ref.config_label,
            "axis_label": ref.axis_label,
            "run_dir": None if ref.run_dir is None else str(ref.run_dir)}
    if ref.waiting:
        return {**base, "reason": "waiting for its tuning runs"}, None
    if ref.run_dir is None or not (ref.run_dir / "config.yaml").is_file():
        return {**base, "reason": "not started" + (f", status {ref.status}" if ref.status else "")}, None
    cfg_path = ref.run_dir / "config.yaml"
    try:
        cfg = load_config(cfg_path)
    except ConfigError as e:
        raise ReportError(f"{cfg_path}: {'; '.join(str(e).splitlines())}") from None
    base["seed"] = cfg.run.seed if ref.seed is None else ref.seed
    metrics = ref.run_dir / "metrics.jsonl"
    rows = read_metrics_lines(metrics) if metrics.is_file() else []
    evals = [x for x in rows if "eval_loss" in x]
    last_step = max((x.get("step", 0) for x in rows), default=0)
    if not evals or evals[-1]["eval_loss"] is None:  # metrics.jsonl writes a non-finite loss as null
        why = ("no metrics yet" if not rows else f"no eval yet, at step {last_step} of {cfg.train.steps}" if not evals
               else f"the eval loss at step {evals[-1].get('step')} is not finite")
        return {**base, "reason": why}, cfg
    if ref.status == "diverged":  # its last eval is from before the loss blew up: not a result to compare
        return {**base, "reason": f"diverged, at step {last_step} of {cfg.train.steps}"}, cfg
    if ref.status not in (None, "finished") and last_step < cfg.train.steps:
        # a sweep's run still training (or stopped and not yet resumed): its eval so far is not a final one
        return {**base, "reason": f"{ref.status}, last eval at step {evals[-1].get('step')} of "
                                  f"{cfg.train.steps}"}, cfg
    final = evals[-1]
    extras = extra_metrics(rows, final["step"])
    if ref.result is not None:  # the source's checkpoint scored again: its metrics replace the run's final eval
        if not ref.result.is_file():
            return {**base, "reason": "not evaluated yet"}, cfg
        from lm.sweep.evals import metrics_of

        doc = json.loads(ref.result.read_text())
        final = {**metrics_of(doc), "step": final["step"]}
        extras = {k: v for k, v in final.items() if k not in STANDARD_EVAL and k != "step"}
        evals, base["eval_of"] = [], doc["source"]
    return {
        **base, "config": ref.config or str(cfg_path), "overrides": list(ref.overrides),
        "steps": cfg.train.steps, "step": last_step, "eval_step": final["step"],
        "complete": last_step >= cfg.train.steps,
        "tokens": last_step * cfg.data.batch_size * cfg.data.seq_len,
        "seq_len": cfg.data.seq_len, **static_facts(cfg, cfg_path, cache),
        **{k: v for k, v in final.items() if k in STANDARD_EVAL}, **extras,
        "extra_metrics": [k for k, v in extras.items() if isinstance(v, (int, float)) and not isinstance(v, bool)],
        "eval_curve": [[x["step"], x["eval_loss"]] for x in evals if x["eval_loss"] is not None],
        "eval_curves": {k: [[x["step"], x[k]] for x in evals if isinstance(x.get(k), (int, float))]
                        for k in ("eval_acc", "eval_bpb") if any(k in x for x in evals)},  # loss: eval_curve
        "trained": datetime.date.fromtimestamp(metrics.stat().st_mtime).isoformat(),
    }, cfg


def static_facts(cfg: Config, where: Path, cache: dict[str, dict]) -> dict:
    """Parameters, KV-cache bytes per token, recurrent state bytes per sequence and forward FLOPs per token."""
    key = json.dumps({"model": cfg.to_dict()["model"], "seq_len": cfg.data.seq_len}, sort_keys=True)
    if key not in cache:
        from lm.info import model_info

        try:
            info = model_info(cfg)
        except (ValueError, KeyError, TypeError) as e:
            raise ReportError(f"{where}: cannot build its model ({type(e).__name__}: {e})") from None
        cache[key] = {k: info[k] for k in FACTS}
    return dict(cache[key])


def collection_from_report(path: Path) -> tuple[Collection, dict]:
    """(the Collection, the document) of an earlier report.json: its per-run records stand in for the runs. The
    document gains `what_ran` and `description` from the report.md beside it when it predates storing them."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file (give a report.json written by `attnlab report`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list) or not doc["runs"]:
        raise ReportError(f"{path}: not a report.json (no per-run records under \"runs\")")
    if "what_ran" not in doc:
        doc.update(_written_with(path.with_name("report.md")))
    records, unfinished = doc["runs"], doc.get("unfinished") or []
    labels = lambda k: [x for x in dict.fromkeys(r.get(k) for r in records) if x]
    col = Collection(
        name=doc.get("name"), group=doc.get("group"), baseline=doc.get("baseline"),
        description=doc.get("description") or "", manifests=list(doc.get("manifests") or []),
        records=records, unfinished=unfinished, configs=[],
        variants=list(dict.fromkeys(r["variant"] for r in [*records, *unfinished])),
        config_labels=list(doc.get("configs") or labels("config_label")), axis=list(doc.get("axis") or
                                                                                    labels("axis_label")),
        metric=doc.get("key"), contrasts=[(c["variant"], c["reference"]) for c in doc.get("contrasts") or []],
        tune=doc.get("tune"), tuning=list(doc.get("tuning") or []), left_out=list(doc.get("left_out") or []))
    return col, doc


def _written_with(md: Path) -> dict:
    """`what_ran` (the bullets under '## What ran', less the evidence and recomputation lines this version adds)
    and `description` (the text between the title and the command) of a report.md."""
    try:
        lines = md.read_text().splitlines()
    except OSError:
        raise ReportError(f"{md.parent / 'report.json'} predates stored headers and {md} cannot be read; "
                          f"write the report again from its runs") from None
    try:
        start, end = lines.index("## What ran") + 1, lines.index("## Results")
    except ValueError:
        raise ReportError(f"{md}: no '## What ran' section before '## Results'") from None
    what_ran = [ln[2:] for ln in lines[start:end] if ln.startswith("- ")
                and not ln.startswith(("- Evidence:", "- Statistics recomputed"))]
    command = next((i for i, ln in enumerate(lines) if ln.startswith("Command: ")), 1)
    description = " ".join(ln.strip() for ln in lines[1:command] if ln.strip())
    return {"what_ran": what_ran, "description": description}
