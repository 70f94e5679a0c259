"""Forward+backward timings of the attention ops, per implementation, against the backend's own attention.

`python -m lm.bench.ops --json out.json [--T 1024 4096] ...` times, for each sequence length:
our `softmax_attention`, `kda` and `lightning` (each implementation asked for), and on GPU
`jax.nn.dot_product_attention` with implementation="cudnn" and "xla" as the vendor baselines.
Each entry is the median of `--reps` runs after a warm-up, jit-compiled, gradients w.r.t. every input.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from attention import ops
from lm.bench import add_ops_arguments
from lm.bench.step import machine


def median_time(fn, args, reps: int) -> float:
    """Median seconds of `reps` calls of fn(*args) after one warm-up call (compilation)."""
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _fwd_bwd(f):
    def loss(*xs):
        return jnp.sum(f(*xs).astype(jnp.float32))

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(3))))


def softmax_cases(B, T, H, D, dtype, impls, Hkv=None):
    key = jax.random.PRNGKey(0)
    Hkv = Hkv or H
    q, k, v = (jax.random.normal(jax.random.fold_in(key, i), (B, T, h, D), dtype)
               for i, h in enumerate((H, Hkv, Hkv)))
    cases = {f"softmax_attention[{impl}]": lambda q, k, v, impl=impl: ops.softmax_attention(q, k, v, impl=impl)
             for impl in impls}
    if jax.default_backend() == "gpu":
        for impl in ("cudnn", "xla"):
            cases[f"jax.nn.dot_product_attention[{impl}]"] = (
                lambda q, k, v, impl=impl: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl))
    return {name: (f, (q, k, v)) for name, f in cases.items()}


def linear_cases(B, T, H, D, dtype, impls):
    """kda and lightning cases. Gates, betas and decays are arguments (not constants closed over, which
    XLA would fold at compile time, e.g. the gates' cumulative sums); gradients are taken for q, k, v."""
    key = jax.random.PRNGKey(1)
    q, k, v = (jax.random.normal(jax.random.fold_in(key, i), (B, T, H, D), dtype) for i in range(3))
    q = q / jnp.linalg.norm(q.astype(jnp.float32), axis=-1, keepdims=True).astype(dtype)
    k = k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True).astype(dtype)
    g = (-jax.nn.softplus(jax.random.normal(jax.random.fold_in(key, 7), (B, T, H, D), jnp.float32)) * 0.1).astype(dtype)
    beta = jax.nn.sigmoid(jax.random.normal(jax.random.fold_in(key, 8), (B, T, H), jnp.float32)).astype(dtype)
    decay = -jnp.linspace(0.01, 1.0, H)
    cases = {}
    for impl in impls:
        if hasattr(ops, "kda"):
            cases[f"kda[{impl}]"] = (lambda q, k, v, g, beta, impl=impl: ops.kda(q, k, v, g, beta, impl=impl)[0],
                                     (q, k, v, g, beta))
        if hasattr(ops, "lightning"):
            cases[f"lightning[{impl}]"] = (lambda q, k, v, decay, impl=impl: ops.lightning(q, k, v, decay,
                                                                                            impl=impl)[0],
                                           (q, k, v, decay))
    return cases


def run(Ts, B, H, D, dtype, impls, reps, Hkv=None, families=("softmax", "linear")) -> list[dict]:
    rows = []
    makers = {"softmax": lambda *a: softmax_cases(*a, Hkv=Hkv), "linear": linear_cases}
    for T in Ts:
        for family in families:
            for name, (f, args) in makers[family](B, T, H, D, dtype, impls).items():
                try:
                    sec = median_time(_fwd_bwd(f), args, reps)
                    rows.append({"op": name, "T": T, "B": B, "H": H, "Hkv": Hkv or H, "D": D,
                                 "dtype": jnp.dtype(dtype).name, "fwd_bwd_ms": sec * 1e3})
                except Exception as e:  # a baseline the backend lacks is reported, not fatal
                    rows.append({"op": name, "T": T, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def bench(a: argparse.Namespace, command: str) -> None:
    """Run the benchmark for parsed options `a`; `command` is recorded in the markdown table."""
    rows = run(a.T, a.B, a.H, a.D, jnp.dtype(a.dtype), a.impl, a.reps, Hkv=a.Hkv, families=a.ops)
    info = machine()
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({**info, "rows": rows}, f, indent=1)
    if a.write:
        write_markdown(Path(a.write), rows, info, command)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    add_ops_arguments(p)
    bench(p.parse_args(argv), "python -m lm.bench.ops " + " ".join(sys.argv[1:] if argv is None else argv))


def write_markdown(path: Path, rows: list[dict], info: dict, args: str) -> None:
    """Time per op and T, plus the growth from the smallest to the largest T next to linear and quadratic."""
    ops_ = list(dict.fromkeys(r["op"] for r in rows))
    Ts = sorted({r["T"] for r in rows})
    ms = {(r["op"], r["T"]): r.get("fwd_bwd_ms") for r in rows}
    # Growth from T=1024 (or the second T) to the largest: the linear ops' criterion is <= 10x over 8x.
    ref = 1024 if 1024 in Ts[:-1] else Ts[min(1, len(Ts) - 1)]
    head = "| op | " + " | ".join(f"T={t}" for t in Ts) + f" | T={Ts[-1]} / T={Ts[0]} | T={Ts[-1]} / T={ref} |"
    lines = [head, "|" + "---|" * (len(Ts) + 3)]
    ratio = lambda a, b: f"{b / a:.1f}x" if a and b else "n/a"
    for op in ops_:
        cells = [f"{ms[(op, t)]:.1f}" if ms.get((op, t)) is not None else "n/a" for t in Ts]
        last = ms.get((op, Ts[-1]))
        lines.append(f"| {op} | " + " | ".join(cells) + f" | {ratio(ms.get((op, Ts[0])), last)} | "
                     f"{ratio(ms.get((op, ref)), last)} |")
    scale = Ts[-1] / Ts[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# Attention ops: forward+backward time (ms) against sequence length\n\n"
        f"Command: `{args}`\n\n"
        f"Machine: {info['cpu']} ({info['cpu_count']} cores), backend {info['backend']} ({info['device']}); "
        f"python {info['python']}, jax {info['jax']}; {info['date']}.\n\n"
        f"Median of the timed repetitions after a warm-up; gradients with respect to q, k and v. "
        f"Linear growth over this range is {scale:.0f}x, quadratic {scale ** 2:.0f}x; from T={ref} "
        f"{Ts[-1] / ref:.0f}x and {(Ts[-1] / ref) ** 2:.0f}x.\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
