"""SP-KV attention cost against gate density: forward+backward FLOPs and time of `softmax_attention` with a hard
gate (0 or -inf, each key kept with probability `density`, independently per sequence and kv head) and a local
window, against plain causal attention of the same shape.

    python -m experiments.bench.spkv_density --impl xla --T 8192 --densities 0.05 0.1 0.3 1.0 \
        --write experiments/results/spkv_density_cpu.md

FLOPs are those of the tiles the implementation computes (`tiles_computed` for xla: every (query block, key
block) tile its loops visit, forward and backward alike), counted as matmul work: per tile and kv head,
G*bq*bk*(8*D + 6*Dv) for the forward's two matmuls and the backward's five. Time is the median over rounds that
alternate every configuration (the machine is shared, so its speed drifts), after a warm-up.
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
from attention.ops.softmax import xla
from lm.bench.step import machine


def _inputs(B, T, Hq, Hkv, D, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, do = (jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in
                   ((B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D), (B, T, Hq, D)))
    return q, k, v, do


def hard_gate(B, T, Hkv, density, seed=1):
    """[B,T,Hkv] 0 where a key is kept (probability `density`, uniformly at random), -inf elsewhere."""
    keep = np.random.default_rng(seed).random((B, T, Hkv)) < density
    return jnp.asarray(np.where(keep, 0.0, -np.inf), jnp.float32)


def fwd_bwd(impl, window, gated):
    """jit of (q, k, v, gate, do) -> the gradients of <o, do> w.r.t. q, k, v (and the gate when gated)."""
    def loss(q, k, v, gate, do):
        o = ops.softmax_attention(q, k, v, key_log_gate=gate if gated else None,
                                  local_window=window if gated else None, impl=impl)
        return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3) if gated else (0, 1, 2)))


def tile_flops(q, k, v, gate, window):
    """(tiles, FLOPs) of the xla path's loops for this call, forward and backward."""
    B, _, Hq, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    tiles, (bq, bk) = jax.jit(lambda q, k, v, g: xla.tiles_computed(
        q, k, v, key_log_gate=g, local_window=None if g is None else window))(q, k, v, gate)
    return int(tiles), int(tiles) * B * Hkv * (Hq // Hkv) * int(bq) * int(bk) * (8 * D + 6 * Dv)


def run(a) -> dict:
    dtype = jnp.dtype(a.dtype)
    q, k, v, do = _inputs(a.B, a.T, a.Hq, a.Hkv, a.D, dtype)
    configs = {"dense causal": (None, fwd_bwd(a.impl, a.window, False))}
    for d in a.densities:
        configs[f"SP-KV density {d}"] = (hard_gate(a.B, a.T, a.Hkv, d), fwd_bwd(a.impl, a.window, True))
    rows = {}
    for name, (gate, fn) in configs.items():
        args = (q, k, v, gate, do)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        tiles, flops = tile_flops(q, k, v, gate, a.window)
        kept = None if gate is None else float(np.isfinite(np.asarray(gate)).mean())
        rows[name] = dict(config=name, kept=kept, tiles=tiles, flops=flops, compile_s=time.perf_counter() - t0,
                          times=[])
        print(f"{name}: warm-up {rows[name]['compile_s']:.1f} s, {tiles} tiles", file=sys.stderr, flush=True)
    for r in range(a.rounds):
        for name, (gate, fn) in configs.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(q, k, v, gate, do))
            rows[name]["times"].append(time.perf_counter() - t)
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{n} {rows[n]['times'][-1]:.2f} s" for n in rows),
              file=sys.stderr, flush=True)
    dense = rows["dense causal"]
    for row in rows.values():
        row["median_s"] = float(np.median(row["times"]))
        row["flops_vs_dense"] = row["flops"] / dense["flops"]
        # Paired by round: the ratio within each round, then the median of those.
        row["time_vs_dense"] = float(np.median(np.asarray(row["times"]) / np.asarray(dense["times"])))
    return dict(machine(), impl=a.impl, shape=dict(B=a.B, T=a.T, Hq=a.Hq, Hkv=a.Hkv, D=a.D, dtype=a.dtype,
                                                    local_window=a.window), rows=list(rows.values()))


def markdown(result: dict, command: str) -> str:
    s = result["shape"]
    lines = ["| config | keys kept | tiles | fwd+bwd GFLOP | FLOPs / dense | median time (s) | time / dense |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        kept = "all" if r["kept"] is None else f"{r['kept']:.3f}"
        lines.append(f"| {r['config']} | {kept} | {r['tiles']} | {r['flops'] / 1e9:.1f} | {r['flops_vs_dense']:.3f} | "
                     f"{r['median_s']:.3f} | {r['time_vs_dense']:.3f} |")
    return (f"# SP-KV attention cost against gate density ({result['impl']})\n\n"
            f"Command: `{command}`\n\n"
            f"Machine: {result['cpu']} ({result['cpu_count']} cores), backend {result['backend']} "
            f"({result['device']}); python {result['python']}, jax {result['jax']}; {result['date']}.\n\n"
            f"Shape: B={s['B']}, T={s['T']}, {s['Hq']} query heads, {s['Hkv']} kv heads, head dim {s['D']}, "
            f"{s['dtype']}, causal, local window {s['local_window']}; the hard gate keeps each key with the given "
            f"probability, per sequence and kv head. Time: forward and backward (gradients of q, k, v and the "
            f"gate), median of {len(result['rows'][0]['times'])} alternating rounds; time / dense is the median "
            f"of the per-round ratios. FLOPs: the matmul work of the tiles the loops visit.\n\n"
            + "\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", default="xla")
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--Hq", type=int, default=4)
    p.add_argument("--Hkv", type=int, default=1)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--window", type=int, default=64, help="SP-KV's local window")
    p.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.3, 1.0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", dest="json_out")
    p.add_argument("--write", help="markdown table to write")
    a = p.parse_args(argv)
    result = run(a)
    command = "python -m experiments.bench.spkv_density " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(result, command)
    print(text)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=1))
    if a.write:
        Path(a.write).parent.mkdir(parents=True, exist_ok=True)
        Path(a.write).write_text(text)


if __name__ == "__main__":
    main()
