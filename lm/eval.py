"""Evaluate a trained run on its held-out split: loss (nats/token), perplexity, bits per byte."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from lm.checkpoint import Checkpointer
from lm.config import Config, load_config
from lm.train import RunError, Setup, build, eval_batch_size, make_eval_step, open_data, run_eval_batches


def load_run(run_dir: str | Path, overrides: list[str] = ()) -> tuple[Config, Setup, Any, int]:
    """(config, setup, params, step) of the newest usable checkpoint of a run directory."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise RunError(f"{run_dir} is not a run directory (no config.yaml); give runs/<name> of a trained run")
    cfg = load_config(cfg_path, list(overrides))
    setup = build(cfg)
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.train.ckpt_keep)
    try:
        restored = ckpt.restore_latest(setup.abstract_state())
    finally:
        ckpt.close()
    if restored is None:
        raise RunError(f"{run_dir} has no checkpoint yet; train it first (attnlab train {cfg_path})")
    step, state, _, _ = restored
    return cfg, setup, state["params"], step


def evaluate(run_dir: str | Path, *, max_batches: int | None = None, overrides: list[str] = ()) -> dict:
    cfg, setup, params, step = load_run(run_dir, overrides)
    ds = open_data(cfg)
    batches = ds.eval_batches(seq_len=cfg.data.seq_len, batch_size=eval_batch_size(cfg), max_batches=max_batches,
                              process_index=jax.process_index(), process_count=jax.process_count())
    eval_step = jax.jit(make_eval_step(setup.mdef), in_shardings=(setup.param_sh, setup.batch_sh))
    res, report = run_eval_batches(eval_step, params, batches, setup.batch_sh, ds.bits_per_byte_factor(),
                                   setup.mdef.merge(params).report_stats)
    return {"run": str(run_dir), "step": step, **res, "batches": len(batches), "summary": report.summary}
