"""The dense matmuls of one configs/bench/cpu_d512_l8.yaml train step, op by op, in XLA:CPU and in torch.

    python -m experiments.bench.dense_matmuls --torch-python /tmp/torchvenv/bin/python [--rounds 2] [--cores N]
        [--xla-flags "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_onednn_custom_call=true"]

The step's 8 layers each run q, k, v and o (4096x512 @ 512x512) and the MLP (512 -> 2048 -> 512) forward (NN),
their input gradients (NT: the weight transposed) and their weight gradients (TN: the activations transposed),
fp32 at full precision. Each product is timed alone (median of 7 calls); a step's total weights each by how often
the step runs it. The frameworks alternate by round, each in its own process; `--cores N` pins both to the first N
CPUs (torch runs N threads) and each `--xla-flags` adds an attnlab process with those XLA_FLAGS.

This is the part of the step that a framework hands to its matmul library (XLA:CPU: YNNPACK by default, Eigen where
YNNPACK declines a layout; torch: MKL), so it shows how much of a step-time gap is the library's, not the program's.
Writes experiments/results/cpu_dense_matmuls.md (or --out). The worker (`--worker jax|torch`) imports only numpy
and its framework, so the torch side runs in a throwaway venv without attnlab.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOKENS, LAYERS = 4096, 8  # batch 8 x seq 512; n_layers


def products() -> list[tuple[str, tuple[int, int], tuple[int, int], str, int]]:
    """(name, lhs shape, rhs shape, layout, runs per step) for every dense product of one step."""
    out = []
    for name, k, n, per_layer in (("qkvo", 512, 512, 4), ("mlp_up", 512, 2048, 1), ("mlp_down", 2048, 512, 1)):
        out += [(f"{name} fwd", (TOKENS, k), (k, n), "NN", LAYERS * per_layer),
                (f"{name} d_input", (TOKENS, n), (k, n), "NT", LAYERS * per_layer),
                (f"{name} d_weight", (TOKENS, k), (TOKENS, n), "TN", LAYERS * per_layer)]
    return out


def _jax_fns():
    from lm import runtime
    runtime.keep_host_memory()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    dims = {"NN": (((1,), (0,)), ((), ())), "NT": (((1,), (1,)), ((), ())), "TN": (((0,), (0,)), ((), ()))}
    rng = np.random.default_rng(0)
    fns = []
    for _, a, b, layout, _ in products():
        x, y = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (a, b))
        c = jax.jit(lambda x, y, d=dims[layout]: lax.dot_general(x, y, d, precision=lax.Precision.HIGHEST))
        c = c.lower(x, y).compile()
        fns.append(lambda c=c, x=x, y=y: jax.block_until_ready(c(x, y)))
    return fns, f"jax {jax.__version__}"


def _torch_fns(threads: int):
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fns = []
    for _, a, b, layout, _ in products():
        x, y = torch.randn(*a), torch.randn(*b)
        fns.append({"NN": lambda x=x, y=y: x @ y, "NT": lambda x=x, y=y: x @ y.T,
                    "TN": lambda x=x, y=y: x.T @ y}[layout])
    return fns, f"torch {torch.__version__}"


def worker(framework: str, threads: int, calls: int = 7) -> dict:
    fns, version = _jax_fns() if framework == "jax" else _torch_fns(threads)
    for f in fns:
        f()
    times = [[] for _ in fns]
    for _ in range(calls):  # interleaved, so a drift in the machine's speed hits every product alike
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t)
    med = [statistics.median(t) for t in times]
    return {"framework": version, "median_s": med,
            "step_s": sum(m * runs for m, (*_, runs) in zip(med, products())),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _run(cmd: list[str], cores: int | None, env: dict | None = None) -> dict:
    from experiments.bench.cpu_vs_torch import pinned
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, preexec_fn=pinned(cores),
                         env=None if env is None else {**os.environ, **env})
    return json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{")))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", choices=["jax", "torch"], help="time one framework in this process, print JSON")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (worker mode)")
    p.add_argument("--torch-python", help="a python with torch installed")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cores", type=int, default=None, help="pin every process to this many CPUs; default: all")
    p.add_argument("--xla-flags", action="append", default=[], metavar="FLAGS",
                   help="an extra attnlab process run with XLA_FLAGS=FLAGS (repeatable)")
    p.add_argument("--out", default="experiments/results/cpu_dense_matmuls.md")
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.threads)))
        return
    if not a.torch_python:
        p.error("--torch-python is required (a python with torch installed), or --worker to time one framework")
    from experiments.bench.cpu_vs_torch import check_cores
    check_cores(p, a.cores)
    threads = a.cores or len(os.sched_getaffinity(0))
    jax_cmd = [sys.executable, "-m", "experiments.bench.dense_matmuls", "--worker", "jax"]
    torch_cmd = [a.torch_python, str(Path(__file__).resolve()), "--worker", "torch", "--threads", str(threads)]
    columns = ["attnlab (XLA:CPU defaults)", *[f"attnlab, XLA_FLAGS={f}" for f in a.xla_flags], "torch"]
    rounds = []
    for r in range(a.rounds):
        res = [_run(jax_cmd, a.cores, {"XLA_FLAGS": ""})]
        res += [_run(jax_cmd, a.cores, {"XLA_FLAGS": f}) for f in a.xla_flags]
        res.append(_run(torch_cmd, a.cores))
        rounds.append(res)
        print(f"round {r}: " + ", ".join(f"{c}: {x['step_s']:.2f} s" for c, x in zip(columns, res)), flush=True)
    from experiments.sweep import report_head
    med = [[statistics.median(rd[c]["median_s"][i] for rd in rounds) for i in range(len(products()))]
           for c in range(len(columns))]
    lines = ["| product | layout | runs per step | " + " | ".join(f"{c} (ms)" for c in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for i, (name, a_shape, b_shape, layout, runs) in enumerate(products()):
        lines.append(f"| {name} {a_shape[0]}x{a_shape[1]} · {b_shape[0]}x{b_shape[1]} | {layout} | {runs} | "
                     + " | ".join(f"{med[c][i] * 1e3:.1f}" for c in range(len(columns))) + " |")
    totals = [statistics.median(rd[c]["step_s"] for rd in rounds) for c in range(len(columns))]
    lines.append("| **one step's dense matmuls** (median over rounds) | | | "
                 + " | ".join(f"**{t:.2f} s**" for t in totals) + " |")
    by_round = "\n".join(f"- round {r}: " + ", ".join(f"{c} {x['step_s']:.2f} s" for c, x in zip(columns, rd))
                         for r, rd in enumerate(rounds))
    cpus = f"pinned to {a.cores}" if a.cores else f"all {threads}"
    text = (report_head("Dense matmuls of the CPU bench step, op by op: XLA:CPU against torch",
                        "experiments.bench.dense_matmuls")
            + f"{rounds[0][0]['framework']}, {rounds[0][-1]['framework']}; CPUs: {cpus}. Each cell: the median of "
              f"7 interleaved calls of the product alone, then the median over {a.rounds} rounds; the frameworks "
              "alternate by round, each in its own process.\n\n" + "\n".join(lines) + "\n\nBy round:\n\n"
            + by_round + "\n")
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
