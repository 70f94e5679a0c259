"""Evaluate a trained run on its held-out split: loss (nats/token), perplexity, bits per byte.

By default every full batch of the held-out split is scored. Training's evals score its first
`train.eval_steps` batches, so their numbers differ; `as_in_training` scores exactly those batches and
reproduces the last eval a run logged (with its config unchanged).

Beyond loss, on request (`lm.evals.Request`): associative recall, needle retrieval and decode speed with the
caches' measured bytes, under the record's keys `recall`, `needle` and `decode`; with a cache policy, the loss,
recall and bytes through pruned caches under it, under `cache`.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from lm import evals
from lm.evals import cache_policy, common, decode_speed, needle, recall
from lm.train.rundir import RunError, load_run, local_run_dir, open_run_data
from lm.train.setup import data_rows, eval_batch_size
from lm.train.step import make_eval_step, run_eval_batches


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def evaluate(run_dir: str | Path, *, max_batches: int | None = None, overrides: list[str] = (),
             as_in_training: bool = False, log: Callable[[str], None] = _stderr,
             beyond: evals.Request | None = None) -> dict:
    """The eval record of `run_dir`'s newest checkpoint: `eval_loss`, `eval_ppl`, `eval_bpb`, ..., `eval_tokens`
    and `batches` scored, and `scored` (which batches, in words); with `beyond`, also `recall`, `needle` and
    `decode` as it asks. `log` gets the diagnostics (stderr). Every request is checked before anything is
    scored."""
    if as_in_training and max_batches is not None:
        raise RunError("--as-in-training scores the batches training's evals scored (train.eval_steps); "
                       "give it or --batches, not both")
    beyond = beyond or evals.Request()
    beyond.check()
    cfg, setup, params, step = load_run(run_dir, overrides)
    ds = open_run_data(local_run_dir(run_dir), cfg, log)  # refuses data that changed since training
    plan = _plan_beyond(cfg, ds, beyond, log) if beyond.any() else None
    if as_in_training:
        max_batches = cfg.train.eval_steps
    batches = ds.eval_batches(seq_len=cfg.data.seq_len, batch_size=eval_batch_size(cfg), max_batches=max_batches,
                              process_index=jax.process_index(), process_count=jax.process_count(),
                              rows=data_rows(cfg))
    eval_step = jax.jit(make_eval_step(setup.mdef), in_shardings=(setup.param_sh, setup.batch_sh))
    res, report = run_eval_batches(eval_step, params, batches, setup.batch_sh, ds.bits_per_byte_factor(),
                                   setup.mdef.merge(params).report_stats)
    if as_in_training:
        scored = f"the first {len(batches)} held-out batches, as training's evals (train.eval_steps={max_batches})"
    elif max_batches is not None and len(batches) == max_batches:
        scored = f"the first {len(batches)} held-out batches (--batches {max_batches})"
    elif max_batches is None:
        scored = (f"the whole held-out split; training's evals score its first {cfg.train.eval_steps} batches, "
                  f"--as-in-training gives that number" if cfg.train.eval_steps < len(batches)
                  else "the whole held-out split, as training's evals")
    else:
        scored = f"the whole held-out split ({len(batches)} batches, fewer than --batches {max_batches})"
    record = {"run": str(run_dir), "step": step, **res, "batches": len(batches), "scored": scored,
              "summary": report.summary}
    if plan is not None:
        record.update(_run_beyond(cfg, setup, params, beyond, plan))
        if "policy" in plan:
            record["cache"] = _run_policy(cfg, setup, params, beyond, plan, batches, res)
    return record


def _plan_beyond(cfg, ds, req: evals.Request, log: Callable[[str], None]) -> dict:
    """What each requested evaluation will score, resolved against the run (EvalError when it cannot)."""
    plan = {"pool": common.token_pool(cfg, ds)}
    if req.recall:
        plan["power_a"] = float(cfg.data.task.get("power_a", recall.POWER_A)) \
            if getattr(ds, "task", None) == "mqar" else recall.POWER_A
        plan["pairs"] = recall.resolve_pairs(req.recall_pairs, seq_len=cfg.data.seq_len, pool=plan["pool"],
                                             power_a=plan["power_a"])
    if req.needle:
        plan["lengths"] = needle.resolve_lengths(cfg, req.needle_lengths, slide=req.slide)
        needle.filler_source(plan["pool"], req.needle_filler)  # refuses text filler without held-out text
        past = [L for L, mode in plan["lengths"] if mode == "extrapolate"]
        if past:
            log(f"note: needle lengths {', '.join(map(str, past))} are longer than the {cfg.data.seq_len} tokens the "
                f"model trained on (data.seq_len): scored on the whole sequence, extrapolating; --slide scores the "
                f"last {cfg.data.seq_len} tokens instead")
    if req.decode:
        plan["decode"] = decode_speed.default_lengths(cfg, req.decode_prompt, req.decode_steps)
        decode_speed.check_lengths(cfg, *plan["decode"])
        if sum(plan["decode"]) > cfg.data.seq_len:
            log(f"note: decoding {sum(plan['decode'])} tokens, more than the {cfg.data.seq_len} the model trained on "
                f"(data.seq_len): fine for speed and bytes, the tokens themselves are not scored")
        if req.cache_policy is not None:
            plan["policy"] = cache_policy.resolve(cfg, req.cache_policy, req.cache_budget, req.cache_window)
    return plan


def _run_beyond(cfg, setup, params, req: evals.Request, plan: dict) -> dict:
    """The records of the requested evaluations, under `recall`, `needle` and `decode`."""
    C, rows, pool, out = cfg.data.seq_len, eval_batch_size(cfg), plan["pool"], {}
    predictors: dict[int, common.Predict] = {}

    def predict_for(length: int) -> common.Predict:
        if length not in predictors:
            predictors[length] = common.predictor(setup.mdef, params, common.rows_for(rows, C, length))
        return predictors[length]

    if req.recall:
        out["recall"] = recall.score_recall(predict_for(C), pairs=plan["pairs"], seq_len=C,
                                            samples=req.recall_samples, pool=pool, power_a=plan["power_a"])
    if req.needle:
        out["needle"] = needle.score_needle(predict_for, lengths=plan["lengths"],
                                            depths=req.needle_depths or list(needle.DEFAULT_DEPTHS),
                                            samples=req.needle_samples, pool=pool, filler=req.needle_filler,
                                            seq_len=C)
    if req.decode:
        P, steps = plan["decode"]
        prompt = decode_speed.prompt_tokens(np.random.default_rng(decode_speed.PROMPT_SEED), req.decode_batch, P,
                                            ids=pool.content(), text=pool.text)
        out["decode"] = decode_speed.measure_decode(setup.mdef, params, prompt, steps=steps,
                                                    repeats=req.decode_repeats, policy=plan.get("policy"))
    return out


def _run_policy(cfg, setup, params, req: evals.Request, plan: dict, batches: list, full: dict) -> dict:
    """The `cache` record: the scored batches' loss through pruned caches under the plan's policy, beside the
    full forward's `full`, and with --recall the recall through them."""
    policy = plan["policy"]
    out = cache_policy.score(setup.mdef, params, policy, batches, full)
    if req.recall:
        C = cfg.data.seq_len
        predict = cache_policy.predictor(setup.mdef, params, common.rows_for(eval_batch_size(cfg), C, C), policy)
        out["recall"] = recall.score_recall(predict, pairs=plan["pairs"], seq_len=C, samples=req.recall_samples,
                                            pool=plan["pool"], power_a=plan["power_a"])
    return out


def beyond_lines(record: dict) -> list[str]:
    """The human-readable lines of the evaluations beyond loss a record holds."""
    out = []
    for key, mod in (("recall", recall), ("needle", needle), ("decode", decode_speed), ("cache", cache_policy)):
        if key in record:
            out += mod.lines(record[key])
    return out
