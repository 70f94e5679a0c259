"""Peer check, not a test: `attention.ops.kda` against flash-linear-attention's naive recurrences
(PyTorch): `naive_recurrent_kda`, and `naive_recurrent_gated_delta_rule` for the scalar-gate case.

    python experiments/bench/check_fla_naive.py PATH/TO/fla/ops/kda/naive.py \
        [--gdn-naive PATH/TO/fla/ops/gated_delta_rule/naive.py] [--torch-python PY]

PY is an interpreter that has torch and einops (default: the one running this script). fla is not
a dependency of this project, so the two sides run in separate processes and exchange .npz files:
the project's environment needs no torch, the torch one needs no JAX. fla's files are loaded by
path and never copied here.

Compared: outputs, final states and the gradients of <o,do> + <S,dS> w.r.t. q, k, v, g, beta and
the initial state, for our reference and xla implementations. Layouts already agree (time-major,
natural-log g, post-sigmoid beta, fp32 state [B,H,K,V]). fla's naive functions have no packed
documents, so for segment_ids the fla side runs each document on its own (the initial state only
for the first) and concatenates. For GDN fla takes g [B,T,H] (and beta before g); ours gets it
broadcast over K, so our dg is summed over K before the comparison.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from experiments.bench.peer_check import (call_options, load_module, pack, print_comparison,  # noqa: E402
                                          run_torch_side, unpack)

# name: (B, T, H, K, V, gate kind, scale, initial state?, document starts, dtype)
CASES = {
    "moderate_h0": (2, 300, 4, 64, 32, "logsigmoid", None, True, (), "float32"),
    "strong_gates_h0": (1, 200, 2, 32, 32, "strong", None, True, (), "float32"),
    "weak_scale1": (1, 130, 2, 32, 64, "weak", 1.0, False, (), "float32"),
    "segments_h0": (1, 200, 2, 16, 16, "logsigmoid", None, True, (64, 100, 101), "float32"),
    "bf16_inputs_h0": (2, 257, 2, 64, 64, "logsigmoid", None, True, (), "bfloat16"),
    "gdn_scalar_gate_h0": (2, 200, 2, 32, 32, "scalar", None, True, (), "float32"),
}
QUANTITIES = ("o", "S", "dq", "dk", "dv", "dg", "dbeta", "dh0")


def _make_inputs(name, spec, rng):
    B, T, H, K, V, gate, scale, with_h0, starts, _ = spec
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    logsigmoid = lambda x: -np.logaddexp(0.0, -x)
    g = {
        "logsigmoid": lambda: logsigmoid(rng.standard_normal((B, T, H, K))),
        "strong": lambda: -6.0 - 0.5 * np.abs(rng.standard_normal((B, T, H, K))),
        "weak": lambda: logsigmoid(rng.standard_normal((B, T, H, K))) / 16,
        "scalar": lambda: logsigmoid(rng.standard_normal((B, T, H))) / 4,
    }[gate]()
    x = {
        "q": unit(rng.standard_normal((B, T, H, K))), "k": unit(rng.standard_normal((B, T, H, K))),
        "v": rng.standard_normal((B, T, H, V)), "g": g,
        "beta": 1 / (1 + np.exp(-rng.standard_normal((B, T, H)))),
        "do": rng.standard_normal((B, T, H, V)), "dS": rng.standard_normal((B, H, K, V)),
    }
    return pack(name, x, B=B, H=H, K=K, V=V, T=T, starts=starts, scale=scale, with_h0=with_h0, rng=rng)


def _torch_side(kda_path, gdn_path, in_path, out_path):
    import torch

    kda_naive = load_module(kda_path, "fla_kda_naive")
    gdn_naive = load_module(gdn_path, "fla_gdn_naive") if gdn_path else None
    arrays = dict(np.load(in_path))
    out = {}
    for name, (*_, gate, _scale, _h0, _starts, dtype) in CASES.items():
        if gate == "scalar" and gdn_naive is None:
            continue
        c = unpack(arrays, name)
        tdtype = getattr(torch, dtype)
        q, k, v, g, beta = (torch.tensor(c[n]).to(tdtype).requires_grad_() for n in ("q", "k", "v", "g", "beta"))
        h0 = torch.tensor(c["h0"]).requires_grad_() if "h0" in c else None
        scale = None if np.isnan(c["scale"]) else float(c["scale"])
        outs, S = [], None
        for i, (a, b) in enumerate(zip(c["starts"][:-1], c["starts"][1:])):
            piece = [x[:, a:b] for x in (q, k, v, g, beta)]
            h = h0 if i == 0 else None
            if gate == "scalar":
                qd, kd, vd, gd, bd = piece
                o_d, S = gdn_naive.naive_recurrent_gated_delta_rule(qd, kd, vd, bd, gd, scale=scale, initial_state=h,
                                                                    output_final_state=True)
            else:
                o_d, S = kda_naive.naive_recurrent_kda(*piece, scale=scale, initial_state=h, output_final_state=True)
            outs.append(o_d)
        o = torch.cat(outs, dim=1)
        loss = (o.float() * torch.tensor(c["do"]).to(tdtype).float()).sum() + (S * torch.tensor(c["dS"])).sum()
        loss.backward()
        res = {"o": o, "S": S, "dq": q.grad, "dk": k.grad, "dv": v.grad, "dg": g.grad, "dbeta": beta.grad}
        if h0 is not None:
            res["dh0"] = h0.grad
        out.update({f"{name}/{key}": val.detach().float().numpy() for key, val in res.items()})
    np.savez(out_path, **out)


def _jax_side(arrays, names):
    import jax
    import jax.numpy as jnp

    from attention.ops.kda import kda

    results = {}
    for name in names:
        *_, gate, _scale, _h0, _starts, dtype = CASES[name]
        c = unpack(arrays, name)
        q, k, v, g, beta = (jnp.asarray(c[n], dtype) for n in ("q", "k", "v", "g", "beta"))
        if gate == "scalar":
            g = jnp.broadcast_to(g[..., None], q.shape)
        h0, scale, seg = call_options(c, *q.shape[:2])
        h0, seg = (None if x is None else jnp.asarray(x) for x in (h0, seg))
        for impl in ("reference", "xla"):
            def f(q, k, v, g, beta, h0, impl=impl):
                return kda(q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=True,
                           segment_ids=seg, impl=impl)

            (o, S), vjp = jax.vjp(jax.jit(f), q, k, v, g, beta, h0)
            dq, dk, dv, dg, dbeta, dh0 = vjp((jnp.asarray(c["do"], dtype), jnp.asarray(c["dS"])))
            if gate == "scalar":
                dg = jnp.sum(dg.astype(jnp.float32), axis=-1)
            res = {"o": o, "S": S, "dq": dq, "dk": dk, "dv": dv, "dg": dg, "dbeta": dbeta, "dh0": dh0}
            results[(name, impl)] = {key: np.asarray(val, np.float32) for key, val in res.items() if val is not None}
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kda_naive", help="path to fla/ops/kda/naive.py")
    ap.add_argument("--gdn-naive", help="path to fla/ops/gated_delta_rule/naive.py (enables the GDN case)")
    ap.add_argument("--torch-python", default=sys.executable, help="interpreter with torch and einops")
    ap.add_argument("--torch-side", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_side:
        _torch_side(args.kda_naive, args.gdn_naive, *args.torch_side)
        return

    rng = np.random.default_rng(0)
    arrays = {}
    for name, spec in CASES.items():
        arrays.update(_make_inputs(name, spec, rng))
    script_args = [args.kda_naive] + (["--gdn-naive", args.gdn_naive] if args.gdn_naive else [])
    fla = run_torch_side(args.torch_python, __file__, script_args, arrays)
    names = [n for n in CASES if f"{n}/o" in fla]
    print_comparison(_jax_side(arrays, names), fla, QUANTITIES)

if __name__ == "__main__":
    main()
