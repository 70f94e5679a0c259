"""Decode-step attention time and achieved memory bandwidth, per implementation: K,V; K=V; K=V with RoPE keys.

`attnlab bench decode --S 4096 16384 65536 --impl xla pallas --json out.json` times `softmax_decode` (one
new token per sequence against a full cache of S keys) and counts the bytes a decode step must read: the cache
(K and V, or the one K=V array) plus the fp32 validity/gate row. "K=V+rope" is the projection-sharing paper's
setting with RoPE: the cache holds the raw shared projection and the keys are rotated per slot position. Bandwidth = bytes / median time; on a GPU it is
also given as a share of the device's peak HBM bandwidth.
"""
from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

from attention import ops
from lm.bench import add_decode_arguments
from lm.bench.ops import median_time
from lm.bench.step import machine

# Peak HBM bandwidth (bytes/s) of the accelerators the project targets, from the vendors' data sheets.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def peak_bandwidth() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((bw for name, bw in PEAK_BANDWIDTH.items() if name in kind), None)


def run(Ss, B, Hq, Hkv, D, dtype, impls, reps) -> list[dict]:
    rows, peak = [], peak_bandwidth()
    key = jax.random.PRNGKey(0)
    for S in Ss:
        q = jax.random.normal(key, (B, 1, Hq, D), dtype)
        k = jax.random.normal(jax.random.fold_in(key, 1), (B, S, Hkv, D), dtype)
        v = jax.random.normal(jax.random.fold_in(key, 2), (B, S, Hkv, D), dtype)
        valid = jnp.ones((B, S, Hkv), bool)
        pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None, :, None], (B, S, Hkv))
        for impl in impls:
            for mode in ("K,V", "K=V", "K=V+rope"):
                shared = mode != "K,V"
                # Positions are an argument: constants closed over would let XLA fold the rotation tables.
                theta = 1e4 if mode == "K=V+rope" else None
                if shared:
                    f = jax.jit(lambda q, k, valid, pos, impl=impl, theta=theta: ops.softmax_decode(
                        q, k, k, valid, impl=impl, key_rope_theta=theta, key_positions=pos))
                    args = (q, k, valid, pos)
                else:
                    f = jax.jit(lambda q, k, v, valid, impl=impl: ops.softmax_decode(q, k, v, valid, impl=impl))
                    args = (q, k, v, valid)
                cache_bytes = (1 if shared else 2) * B * S * Hkv * D * jnp.dtype(dtype).itemsize
                row = {"op": f"softmax_decode[{impl}]", "kv": mode, "S": S, "B": B,
                       "Hq": Hq, "Hkv": Hkv, "D": D, "dtype": jnp.dtype(dtype).name, "cache_bytes": cache_bytes}
                try:
                    sec = median_time(f, args, reps)
                    row |= {"ms": sec * 1e3, "GBps": (cache_bytes + B * S * Hkv * 4) / sec / 1e9}
                    if peak:
                        row["peak_fraction"] = row["GBps"] * 1e9 / peak
                except Exception as e:  # noqa: BLE001  (an implementation that cannot run is reported)
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def bench(a: argparse.Namespace, command: str) -> list[dict]:
    rows = run(a.S, a.B, a.Hq, a.Hkv, a.D, jnp.dtype(a.dtype), a.impl, a.reps)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({**machine(), "command": command, "rows": rows}, f, indent=1)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_decode_arguments(p)
    bench(p.parse_args(argv), " ".join(sys.argv[1:]) if argv is None else " ".join(argv))


if __name__ == "__main__":
    main()
