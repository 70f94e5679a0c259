"""Peer check, not a test: `attention.ops.lightning` against flash-linear-attention's naive
recurrent simple GLA (PyTorch), with g = the per-head log decay broadcast over time.

    python experiments/bench/check_fla_simple_gla.py PATH/TO/fla/ops/simple_gla/naive.py \
        [--torch-python PY]

PY is an interpreter that has torch and einops (default: the one running this script). fla is not
a dependency of this project, so the two sides run in separate processes and exchange .npz files:
the project's environment needs no torch, the torch one needs no JAX.

Compared: outputs, final states and the gradients of <o,do> + <S,dS> w.r.t. q, k, v and the
initial state (fla has no gradient for a data-independent decay), for our reference and xla
implementations. fla's naive function has no packed-document support, so for segment_ids the fla
side runs each document on its own (the initial state only for the first) and concatenates.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from experiments.bench.peer_check import (call_options, load_module, pack, print_comparison,  # noqa: E402
                                          run_torch_side, unpack)

# name: (B, T, H, K, V, log_decay per head, scale, initial state?, document starts, dtype)
CASES = {
    "mixed_decays_h0": (2, 300, 4, 64, 32, (0.0, -0.01, -1.0, -8.0), None, True, (), "float32"),
    "tnl_scale1_long": (1, 1000, 2, 32, 32, (-0.5, -2.0 ** -8), 1.0, False, (), "float32"),
    "segments_h0": (1, 200, 4, 16, 16, (0.0, -0.05, -0.7, -8.0), None, True, (70, 128, 129), "float32"),
    "bf16_inputs_h0": (2, 257, 4, 64, 64, (0.0, -0.01, -1.0, -8.0), None, True, (), "bfloat16"),
}
QUANTITIES = ("o", "S", "dq", "dk", "dv", "dh0")


def _make_inputs(name, spec, rng):
    B, T, H, K, V, ld, scale, with_h0, starts, dtype = spec
    x = {
        "q": rng.standard_normal((B, T, H, K)), "k": rng.standard_normal((B, T, H, K)),
        "v": rng.standard_normal((B, T, H, V)), "do": rng.standard_normal((B, T, H, V)),
        "dS": rng.standard_normal((B, H, K, V)), "log_decay": np.asarray(ld),
    }
    return pack(name, x, B=B, H=H, K=K, V=V, T=T, starts=starts, scale=scale, with_h0=with_h0, rng=rng)


def _torch_side(naive_path, in_path, out_path):
    import torch

    naive = load_module(naive_path, "fla_simple_gla_naive")
    arrays = dict(np.load(in_path))
    out = {}
    for name, (*_, dtype) in CASES.items():
        c = unpack(arrays, name)
        tdtype = getattr(torch, dtype)
        q, k, v = (torch.tensor(c[n]).to(tdtype).requires_grad_() for n in ("q", "k", "v"))
        h0 = torch.tensor(c["h0"]).requires_grad_() if "h0" in c else None
        scale = None if np.isnan(c["scale"]) else float(c["scale"])
        B, T, H = q.shape[:3]
        g = torch.tensor(c["log_decay"]).expand(B, T, H)
        outs, S = [], None
        for i, (a, b) in enumerate(zip(c["starts"][:-1], c["starts"][1:])):
            o_d, S = naive.naive_recurrent_simple_gla(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], scale=scale,
                                                      initial_state=h0 if i == 0 else None,
                                                      output_final_state=True)
            outs.append(o_d)
        o = torch.cat(outs, dim=1)
        loss = (o.float() * torch.tensor(c["do"]).to(tdtype).float()).sum() + (S * torch.tensor(c["dS"])).sum()
        loss.backward()
        res = {"o": o, "S": S, "dq": q.grad, "dk": k.grad, "dv": v.grad}
        if h0 is not None:
            res["dh0"] = h0.grad
        out.update({f"{name}/{key}": val.detach().float().numpy() for key, val in res.items()})
    np.savez(out_path, **out)


def _jax_side(arrays):
    import jax
    import jax.numpy as jnp

    from attention.ops.lightning import lightning

    results = {}
    for name, (*_, dtype) in CASES.items():
        c = unpack(arrays, name)
        q, k, v = (jnp.asarray(c[n], dtype) for n in ("q", "k", "v"))
        h0, scale, seg = call_options(c, *q.shape[:2])
        h0, seg = (None if x is None else jnp.asarray(x) for x in (h0, seg))
        do = jnp.asarray(c["do"], dtype)
        for impl in ("reference", "xla"):
            def f(q, k, v, h0, impl=impl):
                return lightning(q, k, v, jnp.asarray(c["log_decay"]), scale=scale, initial_state=h0,
                                 output_final_state=True, segment_ids=seg, impl=impl)

            (o, S), vjp = jax.vjp(jax.jit(f), q, k, v, h0)
            dq, dk, dv, dh0 = vjp((do, jnp.asarray(c["dS"])))
            res = {"o": o, "S": S, "dq": dq, "dk": dk, "dv": dv, "dh0": dh0}
            results[(name, impl)] = {key: np.asarray(val, np.float32) for key, val in res.items() if val is not None}
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("naive_path", help="path to fla/ops/simple_gla/naive.py")
    ap.add_argument("--torch-python", default=sys.executable, help="interpreter with torch and einops")
    ap.add_argument("--torch-side", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_side:
        _torch_side(args.naive_path, *args.torch_side)
        return

    rng = np.random.default_rng(0)
    arrays = {}
    for name, spec in CASES.items():
        arrays.update(_make_inputs(name, spec, rng))
    fla = run_torch_side(args.torch_python, __file__, [args.naive_path], arrays)
    print_comparison(_jax_side(arrays), fla, QUANTITIES)

if __name__ == "__main__":
    main()
