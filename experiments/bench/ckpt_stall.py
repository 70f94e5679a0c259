"""How long checkpoint saves hold the training loop, with orbax writing in the foreground and in the background.

    python -m experiments.bench.ckpt_stall [--steps 24] [--every 4] [--set KEY=VALUE ...]

Trains the same run twice (configs/bench/cpu_d512_l8.yaml shrunk to short sequences, so the state is large and
the steps short), once with `train.async_checkpoint=false` and once with `true`, saving every `--every` steps,
and reads from metrics.jsonl the seconds each save held the loop (`ckpt_stall_s`) and the step throughput.
Writes experiments/results/ckpt_stall.md.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from experiments.sweep import report_head
from lm.config import load_config
from lm.info import model_info
from lm.tracking import read_metrics
from lm.train import train

CONFIG = "configs/bench/cpu_d512_l8.yaml"
SHAPE = ["data.seq_len=64", "data.batch_size=4", "train.log_every=1", "train.eval_steps=1", "optim.warmup_steps=2",
         "wandb.mode=disabled", "data.source=stdlib"]


def measure(mode: str, steps: int, every: int, out: Path, extra: list[str]) -> dict:
    cfg = load_config(CONFIG, [*SHAPE, f"train.steps={steps}", f"train.ckpt_every={every}", "train.ckpt_keep=2",
                               f"train.async_checkpoint={'true' if mode == 'async' else 'false'}",
                               f"run.name={mode}", f"run.out_dir={out}", *extra])
    train(cfg)
    recs = [r for r in read_metrics(out / mode / "metrics.jsonl") if "loss" in r]
    stalls = [r["ckpt_stall_s"] for r in recs if "ckpt_stall_s" in r]
    return {"mode": mode, "saves": len(stalls), "stall_median_s": float(np.median(stalls)),
            "stall_max_s": float(np.max(stalls)), "params": model_info(cfg)["params"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="experiments/results/ckpt_stall.md")
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-stall-"))
    try:
        rows = [measure(mode, a.steps, a.every, tmp, a.set) for mode in ("sync", "async")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = rows[0]["params"]
    state_mb = n * 4 * 3 / 2**20  # fp32 parameters and two AdamW moments
    lines = ["| checkpoint writes | saves | loop held per save, median | max |", "|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['saves']} | {r['stall_median_s']:.3f} s | {r['stall_max_s']:.3f} s |"
              for r in rows]
    ratio = rows[0]["stall_median_s"] / max(rows[1]["stall_median_s"], 1e-9)
    Path(a.out).write_text(
        report_head("Checkpoint stall: foreground against background writes", "experiments.bench.ckpt_stall")
        + f"Run: {CONFIG} with {' '.join(SHAPE[:2])}, {n / 1e6:.1f}M parameters, so each checkpoint holds about "
          f"{state_mb:.0f} MB of fp32 state (parameters and AdamW moments); {a.steps} steps, a save every "
          f"{a.every} steps (plus the final one), local disk. `ckpt_stall_s` is the time `Checkpointer.save` held "
          f"the loop: the whole write when synchronous; when asynchronous, the copy to host memory plus any wait "
          f"for the previous write.\n\n" + "\n".join(lines) + "\n\n"
        + f"Background writes hold the loop {ratio:.0f}x less per save here. The write itself still takes its time "
          f"in a background thread, which competes with the steps for the CPU cores; step times are not compared "
          f"here (on a 2-core machine they move with whatever else runs).\n")
    print(Path(a.out).read_text())


if __name__ == "__main__":
    main()
