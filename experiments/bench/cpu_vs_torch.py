"""The CPU train step of configs/bench/cpu_d512_l8.yaml in attnlab and in PyTorch eager, side by side in one run.

    python -m experiments.bench.cpu_vs_torch --torch-python /tmp/torchvenv/bin/python [--rounds 2] [--steps 4] \
        [--cores N]

Alternates the two (attnlab, torch, attnlab, torch, ...) so that a drift in the machine's speed hits both, each
in its own process (`attnlab bench step ... --json` and `experiments/bench/torch_step.py --json`), and reports
every round and the median step time of each. torch is not a project dependency; make a throwaway venv:

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy

`--cores N` pins both processes to the machine's first N CPUs (torch then runs N threads): the same comparison
per core, which separates the two frameworks' kernels from how each spreads one step over the cores.

Writes experiments/results/cpu_step_side_by_side.md (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from experiments.sweep import report_head

CONFIG = "configs/bench/cpu_d512_l8.yaml"


def _last_json(out: str) -> dict:
    return json.loads(next(line for line in reversed(out.strip().splitlines()) if line.startswith("{")))


def pinned(cores: int | None):
    """A preexec_fn that pins the child to the first `cores` CPUs this process may use (None: no pinning)."""
    if cores is None:
        return None
    cpus = sorted(os.sched_getaffinity(0))[:cores]
    return lambda: os.sched_setaffinity(0, cpus)


def check_cores(parser: argparse.ArgumentParser, cores: int | None) -> None:
    """A --cores outside 1..(the CPUs this process may use) is a one-line usage error."""
    if cores is not None and not 1 <= cores <= len(os.sched_getaffinity(0)):
        parser.error(f"--cores must be between 1 and {len(os.sched_getaffinity(0))} (the CPUs this process may use); "
                     f"got {cores}")


def run_jax(steps: int, extra: list[str], cores: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "lm.cli", "bench", "step", CONFIG, "--steps", str(steps), "--json",
           *sum((["--set", s] for s in extra), [])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, preexec_fn=pinned(cores))
    return _last_json(out.stdout)


def run_torch(python: str, steps: int, cores: int | None = None) -> dict:
    threads = ["--threads", str(cores)] if cores else []
    out = subprocess.run([python, "experiments/bench/torch_step.py", "--steps", str(steps), "--json", *threads],
                         capture_output=True, text=True, check=True, preexec_fn=pinned(cores))
    return _last_json(out.stdout)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--torch-python", required=True, help="a python with torch installed")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for the attnlab run")
    p.add_argument("--cores", type=int, default=None,
                   help="pin both frameworks to this many CPUs (torch runs as many threads); default: all")
    p.add_argument("--out", default="experiments/results/cpu_step_side_by_side.md")
    a = p.parse_args(argv)
    check_cores(p, a.cores)
    rows = []
    for r in range(a.rounds):
        j = run_jax(a.steps, a.set, a.cores)
        t = run_torch(a.torch_python, a.steps, a.cores)
        rows.append((r, j, t))
        print(f"round {r}: attnlab {j['step_s_median']:.2f} s/step, torch {t['step_s_median']:.2f} s/step", flush=True)
    js = statistics.median(j["step_s_median"] for _, j, _ in rows)
    ts = statistics.median(t["step_s_median"] for _, _, t in rows)
    tok = rows[0][1]["tokens_per_step"]
    lines = ["| round | attnlab step | torch eager step | attnlab / torch speed | attnlab page faults per step |",
             "|---|---|---|---|---|"]
    lines += [f"| {r} | {j['step_s_median']:.2f} s | {t['step_s_median']:.2f} s | "
              f"{t['step_s_median'] / j['step_s_median']:.2f}x | {j.get('page_faults_per_step', '?')} |"
              for r, j, t in rows]
    lines.append(f"| median | {js:.2f} s ({tok / js:,.0f} tok/s) | {ts:.2f} s ({tok / ts:,.0f} tok/s) | "
                 f"**{ts / js:.2f}x** | |")
    torch_ver = rows[0][2].get("framework", "torch ?")
    cpus = f"pinned to {a.cores}" if a.cores else f"all {len(os.sched_getaffinity(0))}"
    Path(a.out).write_text(
        report_head("CPU train step: attnlab against PyTorch eager, side by side", "experiments.bench.cpu_vs_torch")
        + f"Model: {CONFIG} (d_model 512, 8 layers, 8 heads, GELU MLP 2048, RMSNorm, RoPE, tied embeddings, vocab "
          f"256, seq 512, batch 8, fp32; {rows[0][1]['params'] / 1e6:.1f}M parameters), the same step in "
          f"experiments/bench/torch_step.py ({torch_ver}, SDPA attention, foreach AdamW). Each entry "
          f"is the median of {a.steps} timed steps after a warm-up, in its own process; the rounds alternate the "
          f"two frameworks. attnlab overrides: {a.set or 'none'}. CPUs: {cpus}.\n\n" + "\n".join(lines) + "\n")
    print(Path(a.out).read_text())


if __name__ == "__main__":
    main()
