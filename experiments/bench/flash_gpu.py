"""Softmax attention forward+backward on one accelerator: our implementations against cuDNN and tokamax, with
TFLOP/s, for the GPU suite (experiments/bench/gpu_suite.sh).

    python -m experiments.bench.flash_gpu --T 1024 4096 16384 32768 --D 64 128 --heads 16/4 16/16 \
        --masks causal window:1024 --spkv-density 0.1 --json out.json --write out.md

Per case (sequence length, head dim, query/kv heads, mask) every implementation runs the gradients of
<o, dO> w.r.t. q, k and v in bf16: ours through `softmax_attention(impl=...)` (xla, pallas, cudnn, auto) and
the baselines `jax.nn.dot_product_attention(implementation="cudnn")` and tokamax's Triton and Mosaic GPU kernels
(when tokamax is installed: `pip install attnlab[tokamax]`). Times are medians over rounds that alternate the
implementations, after a warm-up. TFLOP/s counts the matmul work of the visible pairs: 4*D per pair forward
and 2.5 times that backward. SP-KV cases (--spkv-density) add a hard gate keeping that share of the keys with a
64-key local window: ours (pallas, xla) against cuDNN's dense causal attention of the same shape, which cannot
skip. A failing implementation is recorded with its error and the run goes on; --budget-s stops starting new
cases once spent (the rest are listed as not run).
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
from lm.bench.step import machine

SPKV_WINDOW = 64


def _ours(impl):
    def f(q, k, v, *, window, gate):
        return ops.softmax_attention(q, k, v, sliding_window=window, key_log_gate=gate,
                                     local_window=None if gate is None else SPKV_WINDOW, impl=impl)
    return f


def _jax_cudnn(q, k, v, *, window, gate):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn",
                                        local_window_size=None if window is None else (window - 1, 0))


def _tokamax(implementation):
    def f(q, k, v, *, window, gate):
        import tokamax  # the optional extra: a baseline, never a dependency of the package
        return tokamax.dot_product_attention(q, k, v, is_causal=True, implementation=implementation,
                                             local_window_size=None if window is None else (window - 1, 0))
    return f


IMPLS = {"xla": _ours("xla"), "pallas": _ours("pallas"), "cudnn": _ours("cudnn"), "auto": _ours("auto"),
         "jax-cudnn": _jax_cudnn, "tokamax-triton": _tokamax("triton"), "tokamax-mosaic": _tokamax("mosaic")}
# What can run an SP-KV call (a gate): ours; the dense baselines run the same shape without the gate.
GATED = ("pallas", "xla", "auto")


def pairs(T: int, window: int | None) -> int:
    """Visible (query, key) pairs of causal attention, with an optional sliding window."""
    t = np.arange(T)
    return int(np.minimum(t + 1, window).sum() if window else T * (T + 1) // 2)


def spkv_pairs(T: int, kept: np.ndarray) -> float:
    """Mean over (sequence, kv head) of the pairs SP-KV attends: the local window plus the kept older keys."""
    t = np.arange(T)
    local = np.minimum(t + 1, SPKV_WINDOW).sum()
    older = np.cumsum(kept, axis=1)  # [B, T, H] kept keys up to each position
    far = np.where(t[None, :, None] >= SPKV_WINDOW, np.take(older, np.maximum(t - SPKV_WINDOW, 0), axis=1), 0)
    return float(local + far.sum(axis=1).mean())


def _grad_fn(f, window, with_gate):
    def loss(q, k, v, gate, do):
        o = f(q, k, v, window=window, gate=gate if with_gate else None)
        return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def run_case(T, D, Hq, Hkv, mask, impls, reps, density=None, B=1, seed=0):
    """One case: {impl: seconds or error}, the FLOPs counted, and a label."""
    rng = np.random.default_rng(seed)
    q, k, v, do = (jnp.asarray(rng.standard_normal(s, np.float32), jnp.bfloat16)
                   for s in ((B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D), (B, T, Hq, D)))
    window = int(mask.split(":")[1]) if mask.startswith("window:") else None
    gate = None
    n_pairs = pairs(T, window)
    if density is not None:
        kept = rng.random((B, T, Hkv)) < density
        gate = jnp.asarray(np.where(kept, 0.0, -np.inf), jnp.float32)
        n_pairs = spkv_pairs(T, kept)
    flops = 3.5 * 4 * B * Hq * D * n_pairs
    fns, result = {}, {}
    for impl in impls:
        f = _grad_fn(IMPLS[impl], window, with_gate=density is not None and impl in GATED)
        try:
            jax.block_until_ready(f(q, k, v, gate, do))
            fns[impl] = f
        except Exception as e:  # noqa: BLE001  (a failing implementation is a result)
            result[impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    times = {impl: [] for impl in fns}
    for _ in range(reps):
        for impl, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(q, k, v, gate, do))
            times[impl].append(time.perf_counter() - t0)
    for impl, ts in times.items():
        result[impl] = float(np.median(ts))
    label = f"T={T} D={D} {Hq}/{Hkv} {mask}" + ("" if density is None else f" SP-KV {density}")
    return dict(label=label, T=T, D=D, Hq=Hq, Hkv=Hkv, mask=mask, density=density, flops=flops, result=result)


def markdown(rows, impls, info, command) -> str:
    head = "| case | " + " | ".join(impls) + " |"
    lines = [head, "|" + "---|" * (len(impls) + 1)]
    for r in rows:
        cells, res = [], r.get("result", {})
        dense = res.get("jax-cudnn", res.get("cudnn"))
        for impl in impls:
            x = res.get(impl)
            if not isinstance(x, float):
                cells.append("n/a" if x is None else "error")
            elif r.get("density") is None:
                cells.append(f"{x * 1e3:.2f} ms ({r['flops'] / x / 1e12:.0f} TFLOP/s)")
            else:  # SP-KV: the speed-up over cuDNN's dense causal attention of the same shape
                cells.append(f"{x * 1e3:.2f} ms" + (f" ({dense / x:.2f}x cuDNN dense)" if isinstance(dense, float)
                                                    else ""))
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    errors = [f"- {r['label']} {impl}: {x}" for r in rows for impl, x in r.get("result", {}).items()
              if isinstance(x, str)]
    skipped = [f"- {r['label']}: not run ({r['skipped']})" for r in rows if "skipped" in r]
    return (f"# Softmax attention forward+backward on {info['device']}\n\nCommand: `{command}`\n\n"
            f"Machine: {info['device']}; python {info['python']}, jax {info['jax']}; {info['date']}. bf16, B=1, "
            f"causal; median of the rounds; TFLOP/s of the visible pairs' matmuls (4*D FLOPs per pair forward, "
            f"2.5x that backward); SP-KV rows: ours with the gate, the dense kernels without it.\n\n"
            + "\n".join(lines) + "\n"
            + ("\n## Errors\n\n" + "\n".join(errors) + "\n" if errors else "")
            + ("\n## Not run\n\n" + "\n".join(skipped) + "\n" if skipped else ""))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--D", type=int, nargs="+", default=[64, 128])
    p.add_argument("--heads", nargs="+", default=["16/4", "16/16"], help="query/kv heads")
    p.add_argument("--masks", nargs="+", default=["causal", "window:1024"])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--spkv-density", type=float, nargs="*", default=[0.1],
                   help="SP-KV hard-gate cases (causal, window 64) at each density, at the largest head dim")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=None, help="start no new case after this many seconds")
    p.add_argument("--json", dest="json_out")
    p.add_argument("--write")
    a = p.parse_args(argv)
    impls = [i for i in a.impls if not i.startswith("tokamax")]
    try:
        import tokamax  # noqa: F401
        impls += [i for i in a.impls if i.startswith("tokamax")]
    except ImportError:
        print("tokamax is not installed (pip install attnlab[tokamax]): its baselines are left out", file=sys.stderr)
    # SP-KV first, then the grid in the order given: with a budget, what is listed first runs.
    cases = [(T, max(a.D), int(a.heads[0].split("/")[0]), int(a.heads[0].split("/")[1]), "causal", d)
             for d in a.spkv_density for T in a.T]
    cases += [(T, D, int(h.split("/")[0]), int(h.split("/")[1]), m, None)
              for D in a.D for h in a.heads for m in a.masks for T in a.T]
    start, rows = time.perf_counter(), []
    for T, D, Hq, Hkv, mask, density in cases:
        label = f"T={T} D={D} {Hq}/{Hkv} {mask}" + ("" if density is None else f" SP-KV {density}")
        if a.budget_s is not None and time.perf_counter() - start > a.budget_s:
            rows.append(dict(label=label, skipped=f"past the {a.budget_s:.0f} s budget"))
            continue
        chosen = impls if density is None else [i for i in impls if i in GATED or i in ("cudnn", "jax-cudnn")]
        row = run_case(T, D, Hq, Hkv, mask, chosen, a.reps, density)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    info = machine()
    command = "python -m experiments.bench.flash_gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(dict(info, command=command, rows=rows), indent=1))
    text = markdown(rows, impls, info, command)
    if a.write:
        Path(a.write).parent.mkdir(parents=True, exist_ok=True)
        Path(a.write).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
