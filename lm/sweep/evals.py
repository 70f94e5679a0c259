"""A sweep's inference-time variants (`evals:` of a spec, lm/sweep/spec.py EvalVariant): each seed's finished run of
the variant it names, scored again, its record written to `<sweep dir>/evals/<label>-s<seed>.json`.

The score is `lm.eval.evaluate` on the batches the run's training evals scored (so the eval variant pairs with its
source, and with the other variants, seed by seed): with eval-time overrides, and with a cache policy through
pruned caches (the policy's loss and accuracy replace the full forward's, which stays in the record as
`full_loss`). An eval whose record exists is not run again.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from lm.sweep.spec import EvalVariant, Run, Sweep

DECODE_STEPS = 1  # a cache policy rides on the decode eval; its timing is not what these variants measure


def pending(sweep: Sweep) -> list[tuple[EvalVariant, Run]]:
    """(eval variant, source run) for every seed whose source run is in the sweep (a tuned variant's once chosen)."""
    return [(e, r) for e in sweep.evals for r in sweep.runs if r.stage == "main" and r.variant == e.of]


def result_path(sweep: Sweep, e: EvalVariant, seed: int) -> Path:
    return Path(sweep.sweep_dir) / "evals" / f"{e.label}-s{seed}.json"


def run_evals(sweep: Sweep, statuses: dict[str, str], say) -> None:
    """Score every eval variant whose source run has finished and whose record is not written yet."""
    from lm.eval import evaluate
    from lm.evals import Request

    for e, source in pending(sweep):
        out = result_path(sweep, e, source.seed)
        if out.is_file() or statuses.get(source.name) != "finished":
            continue
        request = Request(decode=True, decode_steps=DECODE_STEPS, decode_repeats=1, cache_policy=e.cache_policy,
                          cache_budget=e.cache_budget, cache_window=e.cache_window) if e.cache_policy else None
        record = evaluate(source.run_dir, overrides=list(e.overrides), as_in_training=True, beyond=request,
                          log=lambda msg: None)
        record.pop("decode", None)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps({"eval": e.settings(), "source": source.name, "seed": source.seed,
                                   "record": record}, indent=1))
        os.replace(tmp, out)
        metric = record["cache"]["accuracy" if sweep.metric == "eval_acc" else "loss"] if e.cache_policy else \
            record.get(sweep.metric)
        say(f"eval {e.label}-s{source.seed} (of {source.name}): {sweep.metric} {metric:.4f}")


def metrics_of(doc: dict) -> dict:
    """The eval metrics of a written record: through the caches when a policy was used (eval_loss, eval_acc and
    the cache's held bytes and evictions), else the record's own (with the mixers' metrics, e.g. SP-KV density at
    the threshold it was scored with)."""
    record = doc["record"]
    if "cache" not in record:
        return {k: v for k, v in record.items() if k not in ("step", "batches")
                and isinstance(v, (int, float)) and not isinstance(v, bool)}
    cache = record["cache"]
    return {"eval_loss": cache["loss"], "eval_acc": cache["accuracy"], "eval_tokens": cache["tokens"],
            "full_eval_loss": cache["full_loss"], **{k: cache[k] for k in (
                "held_kv_bytes_per_sequence", "dense_kv_bytes_per_sequence", "evicted_per_sequence")}}


__all__ = ["pending", "result_path", "run_evals", "metrics_of"]
