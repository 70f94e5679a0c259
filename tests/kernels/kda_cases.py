"""Parity cases of `kda`: every registered implementation against the token-by-token reference, on the output,
the final state and every gradient (q, k, v, g, beta, initial state), fp32, 1e-5 relative.

Compiles dominate the runtime, so the main case is one batch of several scenarios, one per row (rows never
interact, so each row's slice of every output and gradient is that scenario's own), compared row by row.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attention.ops import dispatch
from tests.numerics import assert_close

OP = "kda"
H, K, V = 2, 16, 32
T_MAIN = 130  # three chunks, the last one ragged
ROWS = ("moderate", "strong", "documents", "spanning", "long_memory")
GRADS = ("dq", "dk", "dv", "dg", "dbeta", "dh0")


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _doc_ids(T, starts):
    ids = np.zeros(T, np.int32)
    for s in starts:
        ids[s:] += 1
    return ids


def main_inputs():
    """One row per scenario, T=130, every row with an initial state and segment ids."""
    rng = np.random.default_rng(0)
    B = len(ROWS)
    q = unit(rng.standard_normal((B, T_MAIN, H, K)))
    k = unit(rng.standard_normal((B, T_MAIN, H, K)))
    v = rng.standard_normal((B, T_MAIN, H, V))
    beta = 1 / (1 + np.exp(-rng.standard_normal((B, T_MAIN, H))))
    logsig = -np.logaddexp(0, -rng.standard_normal((B, T_MAIN, H, K)))  # log sigmoid, < 0
    g = np.empty((B, T_MAIN, H, K))
    g[0] = logsig[0]
    # About -6 per token: a chunk's cumulative log decay reaches about -400, so exp(-Gamma) would
    # overflow fp32 in any chunk-wide factorisation.
    g[1] = -6.0 - 0.5 * np.abs(rng.standard_normal((T_MAIN, H, K)))
    g[2] = logsig[2]
    # Mixed: half the channels never decay (g = 0 exactly); the others mostly decay a little, with
    # rare -20 spikes, so small gates follow large ones inside a chunk.
    spikes = rng.random((T_MAIN, H, K)) < 0.05
    g[3] = np.where(spikes, -20.0, 0.05 * logsig[3])
    g[3][..., : K // 2] = 0.0
    g[4] = logsig[4] / 16
    seg = np.zeros((B, T_MAIN), np.int32)
    # Boundaries exactly at chunk starts (64, 128), mid-chunk (30, 100) and one-token documents
    # (100, 129).
    seg[2] = _doc_ids(T_MAIN, [30, 64, 100, 101, 128, 129])
    # Documents that start inside one chunk and run across the next chunk boundary.
    seg[3] = _doc_ids(T_MAIN, [50, 120])
    # Ids need not be unique or increasing: a run of equal ids is one document.
    seg[4] = np.repeat([7, 3, 7, 7], [40, 33, 20, 37])
    h0 = rng.standard_normal((B, H, K, V))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return dict(q=f32(q), k=f32(k), v=f32(v), g=f32(g), beta=f32(beta), h0=f32(h0),
                seg=jnp.asarray(seg), do=f32(rng.standard_normal((B, T_MAIN, H, V))),
                dS=f32(rng.standard_normal((B, H, K, V))))


@functools.partial(jax.jit, static_argnames=("fn", "final"))
def _forward_and_grads(q, k, v, g, beta, h0, seg, do, dS, *, fn, final):
    """o, final state and the gradients of sum(o*do) + sum(S*dS) w.r.t. every input."""
    primals = (q, k, v, g, beta) + (() if h0 is None else (h0,))

    def loss(*p):
        h = p[5] if len(p) > 5 else None
        o, S = fn(*p[:5], initial_state=h, output_final_state=final, segment_ids=seg)
        value = jnp.sum(o.astype(jnp.float32) * do)
        if final:
            value = value + jnp.sum(S * dS)
        return value, (o, S)

    (_, (o, S)), grads = jax.value_and_grad(loss, argnums=tuple(range(len(primals))), has_aux=True)(*primals)
    return o, S, dict(zip(GRADS, grads))


def run_inputs(inputs, impl, *, final=True, **overrides):
    """o, final state (None unless `final`) and the gradients, through implementation `impl`."""
    x = {**inputs, **overrides}
    return _forward_and_grads(x["q"], x["k"], x["v"], x["g"], x["beta"], x["h0"], x["seg"], x["do"],
                              x["dS"], fn=dispatch.implementations(OP)[impl], final=final)


def _small(T, *, seed, state, segments):
    """A batch of 2 at length T (ragged against the chunk, or shorter than one)."""
    rng = np.random.default_rng(seed)
    B = 2
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    seg = np.zeros((B, T), np.int32)
    if segments:
        seg[0] = _doc_ids(T, [T // 2])
    return dict(q=f32(unit(rng.standard_normal((B, T, H, K)))), k=f32(unit(rng.standard_normal((B, T, H, K)))),
                v=f32(rng.standard_normal((B, T, H, V))), g=f32(-np.logaddexp(0, -rng.standard_normal((B, T, H, K)))),
                beta=f32(1 / (1 + np.exp(-rng.standard_normal((B, T, H))))),
                h0=f32(rng.standard_normal((B, H, K, V))) if state else None,
                seg=jnp.asarray(seg) if segments else None, do=f32(rng.standard_normal((B, T, H, V))),
                dS=f32(rng.standard_normal((B, H, K, V))) if state else None)


# name -> (inputs, whether the final state is requested)
CASES = {
    "main": (main_inputs, True),
    # T=100 (ragged), no initial state, no segments, no final state requested
    "ragged-no-state": (functools.partial(_small, 100, seed=2, state=False, segments=False), False),
    # shorter than a chunk, with a document boundary; and one token from a state (a decode step)
    "short": (functools.partial(_small, 5, seed=3, state=True, segments=True), True),
    "one-token": (functools.partial(_small, 1, seed=4, state=True, segments=False), True),
}


@functools.cache
def case_inputs(case):
    return CASES[case][0]()


def run(impl, case):
    make, final = CASES[case]
    return run_inputs(case_inputs(case), impl, final=final)


def compare(got, want, case):
    (o, S, d), (o_r, S_r, d_r) = got, want
    rows = range(len(ROWS)) if case == "main" else [slice(None)]
    for row in rows:
        where = f"{case} row {ROWS[row]}" if case == "main" else case
        assert_close(o[row], o_r[row], rel=1e-5, name=f"{where} o")
        if S_r is not None:
            assert_close(S[row], S_r[row], rel=1e-5, name=f"{where} final state")
        for name in d_r:  # dh0 only with an initial state
            assert_close(d[name][row], d_r[name][row], rel=1e-5, name=f"{where} {name}")
