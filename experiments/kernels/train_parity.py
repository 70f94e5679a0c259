"""Train tiny configs for a few steps with impl=pallas and with impl=xla, from the same seed and data, and compare
the losses step by step. On the CPU the Pallas kernels run interpreted, so this checks the kernels inside a real
training run (forward, backward, optimizer), not their speed.

    python -m experiments.kernels.train_parity --configs softmax share_kv spkv cca --steps 3 \
        --write experiments/results/pallas_train_parity.md
"""
from __future__ import annotations

import argparse
import datetime
import platform as host
import tempfile
import time

import jax

from lm.config import load_config
from lm.tracking import read_metrics
from lm.train import train


# Per-config overrides a run of a few steps needs: SP-KV freezes its predictor for the last step and ramps its
# gate to the hard mask over one step, so the last steps train under the 0/-inf gate.
SHORT_RUN = {"spkv": ["model.mixers.softmax.spkv.anneal.freeze_steps=1",
                      "model.mixers.softmax.spkv.anneal.ramp_steps=1"],
             "spkv_cca": ["model.mixers.cca.spkv.anneal.freeze_steps=1", "model.mixers.cca.spkv.anneal.ramp_steps=1"]}


def losses(config: str, impl: str, steps: int, out_dir: str) -> tuple[list[float], float, dict]:
    cfg = load_config(f"configs/tiny/{config}.yaml", SHORT_RUN.get(config, []) + [
        f"kernels.impl={impl}", f"train.steps={steps}", "train.log_every=1", "train.eval_every=0",
        "train.eval_steps=1", "train.ckpt_every=0", "optim.warmup_steps=1", "wandb.mode=disabled",
        f"run.out_dir={out_dir}",
        f"run.name={config}-{impl}"])
    t0 = time.perf_counter()
    res = train(cfg)
    rows = read_metrics(res.run_dir / "metrics.jsonl")
    return [r["loss"] for r in rows if "loss" in r], time.perf_counter() - t0, res.last_eval


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["softmax", "share_kv", "spkv", "cca"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--write", default=None, metavar="FILE.md")
    args = p.parse_args(argv)
    lines = ["| config | step losses, impl=xla | step losses, impl=pallas | max rel. diff | eval loss xla / pallas "
             "| wall s xla / pallas |", "|---|---|---|---|---|---|"]
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            xla, t_x, ev_x = losses(name, "xla", args.steps, tmp)
            pal, t_p, ev_p = losses(name, "pallas", args.steps, tmp)
            rel = max(abs(a - b) / abs(a) for a, b in zip(xla, pal))
            worst = max(worst, rel)
            fmt = lambda xs: " ".join(f"{x:.6f}" for x in xs)  # noqa: E731
            lines.append(f"| {name} | {fmt(xla)} | {fmt(pal)} | {rel:.1e} | {ev_x['eval_loss']:.6f} / "
                         f"{ev_p['eval_loss']:.6f} | {t_x:.0f} / {t_p:.0f} |")
            print(lines[-1], flush=True)
    head = [f"# impl=pallas against impl=xla in training ({args.steps} steps, tiny configs)", "",
            f"{datetime.date.today()}, {host.machine()} CPU ({jax.device_count()} device, {jax.default_backend()}), "
            f"jax {jax.__version__}; the Pallas kernels run interpreted on the CPU. fp32, same seed and batches.",
            "", "Command: `python -m experiments.kernels.train_parity --configs " + " ".join(args.configs)
            + f" --steps {args.steps} --write FILE`", ""]
    text = "\n".join(head + lines + ["", f"Largest relative difference of a step loss: {worst:.1e}.", ""])
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
    print(text)
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
