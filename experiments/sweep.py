"""Run a list of trainings one after another and collect their final numbers.

Each run is a config file plus overrides, trained in-process with `lm.train.train`; a run that already
finished is not retrained (train() resumes or skips it), so a sweep interrupted anywhere continues
where it stopped when the same command is run again. Results are the last eval line of each run plus
the model's static facts (`lm.info.model_info`).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import sys
from pathlib import Path

import jax

from lm.config import load_config
from lm.flops import cpu_model
from lm.info import model_info
from lm.report.collect import extra_metrics
from lm.report.stats import paired, paired_cell, summarize  # noqa: F401 (the ablations import them from here)
from lm.tracking import read_metrics
from lm.train import train


@dataclasses.dataclass(frozen=True)
class Run:
    label: str  # row name in the report, e.g. "share_kv"
    config: str
    overrides: tuple[str, ...] = ()
    seed: int = 0
    init_from: str | None = None  # a run directory whose matching parameters start this run (train --init-from)

    @property
    def name(self) -> str:
        return f"{self.label}-s{self.seed}"


def run_all(runs: list[Run], out_dir: str | Path, *, common: tuple[str, ...] = ()) -> list[dict]:
    """Train every run (skipping finished ones) and return one record per run."""
    records = []
    for i, r in enumerate(runs):
        over = [*common, *r.overrides, f"run.name={r.name}", f"run.out_dir={out_dir}", f"run.seed={r.seed}"]
        cfg = load_config(r.config, over)
        print(f"[{i + 1}/{len(runs)}] {r.name}: {r.config} {' '.join(r.overrides)}", flush=True)
        res = train(cfg, init_from=r.init_from)
        if res.status not in ("finished", "already_finished"):
            raise RuntimeError(f"run {r.name} stopped: {res.status} {res.message}")
        rows = read_metrics(Path(out_dir) / r.name / "metrics.jsonl")
        evals = [x for x in rows if "eval_loss" in x]
        info = model_info(cfg)
        records.append({"label": r.label, "seed": r.seed, "config": r.config, "overrides": list(r.overrides),
                        "init_from": r.init_from,
                        "steps": cfg.train.steps, "tokens": cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len,
                        **{k: info[k] for k in ("params", "kv_cache_bytes_per_token", "state_bytes_per_sequence",
                                                "flops_per_token")},
                        **{k: v for k, v in evals[-1].items() if k != "step"}, "eval_curve": evals,
                        **_extra_metrics(rows)})
    return records


def _extra_metrics(rows: list[dict]) -> dict:
    """Metrics a mixer logged at eval time beyond loss (e.g. SP-KV density), from the last eval step."""
    return extra_metrics(rows, max((x["step"] for x in rows if "eval_loss" in x), default=None))


def provenance() -> str:
    return (f"{cpu_model()}, backend {jax.default_backend()}; python {platform.python_version()}, jax {jax.__version__}; "
            f"{datetime.date.today().isoformat()}")


def report_head(title: str, module: str) -> str:
    """The opening of a results file: title, the command that made it (`python -m module` with this
    process's arguments), machine and versions."""
    args = " ".join(sys.argv[1:])
    return f"# {title}\n\nCommand: `python -m {module} {args}`\n\nMachine: {provenance()}.\n\n"


def budget(records: list[dict], steps: int) -> str:
    """'100 steps = 409,600 tokens, seeds [0, 1]': what every run of a sweep trained on."""
    return f"{steps} steps = {records[0]['tokens']:,} tokens, seeds {sorted({r['seed'] for r in records})}"


def save_records(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))
