"""Evaluate a trained run on its held-out split: loss (nats/token), perplexity, bits per byte."""
from __future__ import annotations

from pathlib import Path

import jax

from lm.train.rundir import load_run
from lm.train.setup import eval_batch_size, open_data
from lm.train.step import make_eval_step, run_eval_batches


def evaluate(run_dir: str | Path, *, max_batches: int | None = None, overrides: list[str] = ()) -> dict:
    cfg, setup, params, step = load_run(run_dir, overrides)
    ds = open_data(cfg)
    batches = ds.eval_batches(seq_len=cfg.data.seq_len, batch_size=eval_batch_size(cfg), max_batches=max_batches,
                              process_index=jax.process_index(), process_count=jax.process_count())
    eval_step = jax.jit(make_eval_step(setup.mdef), in_shardings=(setup.param_sh, setup.batch_sh))
    res, report = run_eval_batches(eval_step, params, batches, setup.batch_sh, ds.bits_per_byte_factor(),
                                   setup.mdef.merge(params).report_stats)
    return {"run": str(run_dir), "step": step, **res, "batches": len(batches), "summary": report.summary}
