"""Evaluate a trained run on its held-out split: loss (nats/token), perplexity, bits per byte.

By default every full batch of the held-out split is scored. Training's evals score its first
`train.eval_steps` batches, so their numbers differ; `as_in_training` scores exactly those batches and
reproduces the last eval a run logged (with its config unchanged).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import jax

from lm.train.rundir import RunError, load_run, open_run_data
from lm.train.setup import data_rows, eval_batch_size
from lm.train.step import make_eval_step, run_eval_batches


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def evaluate(run_dir: str | Path, *, max_batches: int | None = None, overrides: list[str] = (),
             as_in_training: bool = False, log: Callable[[str], None] = _stderr) -> dict:
    """The eval record of `run_dir`'s newest checkpoint: `eval_loss`, `eval_ppl`, `eval_bpb`, ..., `eval_tokens`
    and `batches` scored, and `scored` (which batches, in words). `log` gets the diagnostics (stderr)."""
    if as_in_training and max_batches is not None:
        raise RunError("--as-in-training scores the batches training's evals scored (train.eval_steps); "
                       "give it or --batches, not both")
    cfg, setup, params, step = load_run(run_dir, overrides)
    ds = open_run_data(Path(run_dir), cfg, log)  # refuses data that changed since training
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
    return {"run": str(run_dir), "step": step, **res, "batches": len(batches), "scored": scored,
            "summary": report.summary}
