"""The KDA forward kernel: grid (batch, head), a loop over chunks inside with the fp32 state [K, V] as carry
(see chunk.py for the algebra of one chunk). Writes the output and the final state."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import platform
from kernels_pallas.kda.chunk import Plan, cumulative, dot, row_of, scores, solve_unit_lower

# (chunk, num_warps) per target: fla's chunk of 64 everywhere; unmeasured on GPU and TPU.
CHUNKS = {"cpu": (64, 4), "gpu": (64, 4), "tpu": (64, 4)}
MIN_CHUNK = {"cpu": 8, "gpu": 16, "tpu": 8}


def _kernel(*refs, plan: Plan):
    refs = list(refs)
    q_ref, k_ref, v_ref, g_ref, beta_ref, h0_ref = refs[:6]
    doc_ref, prev_ref = (refs[6], refs[7]) if plan.has_segments else (None, None)
    o_ref, final_ref = refs[-2:]
    C = plan.chunk
    i = lax.broadcasted_iota(jnp.int32, (C, 1), 0)

    def body(n, S):
        rows = pl.ds(pl.multiple_of(n * C, C), C)
        f32 = jnp.float32
        q = q_ref[rows, :].astype(f32) * plan.scale
        k, v = k_ref[rows, :].astype(f32), v_ref[rows, :].astype(f32)
        g, beta = g_ref[rows, :].astype(f32), beta_ref[rows, :].astype(f32)
        real = i < jnp.minimum(C, plan.t - n * C)
        same = carry_in = to_exit = None
        through = jnp.ones((1, 1), bool)
        if plan.has_segments:
            doc, prev = doc_ref[rows, :], prev_ref[rows, :]
            same = doc == doc.reshape(1, C)
            before = jnp.max(jnp.where(i == 0, prev, -1), axis=0, keepdims=True)
            last = jnp.max(jnp.where(real, doc, -1), axis=0, keepdims=True)
            carry_in, to_exit, through = doc == before, doc == last, last == before
        G = cumulative(g)
        aqk, akk = scores(q, k, G, same)
        L = beta * akk
        decayed_k = k * jnp.exp(G)
        k_in = decayed_k if carry_in is None else jnp.where(carry_in, decayed_k, 0.0)
        U = solve_unit_lower(L, beta * v)
        W = solve_unit_lower(L, beta * k_in)
        delta = U - dot(W, S)
        q_in = q * jnp.exp(G)
        q_in = q_in if carry_in is None else jnp.where(carry_in, q_in, 0.0)
        o_ref[rows, :] = (dot(q_in, S) + dot(aqk, delta)).astype(o_ref.dtype)
        k_exit = k * jnp.exp(cumulative(g, reverse=True))
        k_exit = k_exit if to_exit is None else jnp.where(to_exit, k_exit, 0.0)
        decay = jnp.where(through, jnp.exp(row_of(G, C - 1)), 0.0)        # [1, K]; padded gates are 0
        return decay.reshape(-1, 1) * S + dot(k_exit, delta, contract=(0, 0))

    final_ref[...] = lax.fori_loop(0, plan.num_chunks, body, h0_ref[...].astype(jnp.float32))


def forward(plan: Plan, q, k, v, g, beta, h0, doc, prev):
    """q, k, g [B,H,Tp,K]; v [B,H,Tp,V]; beta [B,H,Tp,1]; h0 [B,H,K,V] fp32; doc, prev [B,Tp,1] int32 or None
    -> (o [B,H,Tp,V] in v's dtype, final state [B,H,K,V] fp32)."""
    B, H, Tp, K = q.shape
    V = v.shape[-1]
    row = lambda width: pl.BlockSpec((None, None, Tp, width), lambda b, h: (b, h, 0, 0))  # noqa: E731
    state = pl.BlockSpec((None, None, K, V), lambda b, h: (b, h, 0, 0))
    in_specs = [row(K), row(K), row(V), row(K), row(1), state]
    args = [q, k, v, g, beta, h0]
    if plan.has_segments:
        in_specs += [pl.BlockSpec((None, Tp, 1), lambda b, h: (b, 0, 0))] * 2
        args += [doc, prev]
    out_shape = (jax.ShapeDtypeStruct((B, H, Tp, V), v.dtype), jax.ShapeDtypeStruct((B, H, K, V), jnp.float32))
    return pl.pallas_call(
        functools.partial(_kernel, plan=plan), grid=(B, H), in_specs=in_specs, out_specs=(row(V), state),
        out_shape=out_shape, interpret=plan.interpret, name="kda_forward",
        compiler_params=platform.compiler_params(gpu=dict(num_warps=plan.num_warps, num_stages=2),
                                                 tpu=dict(dimension_semantics=("parallel", "parallel"))),
    )(*args)


def kda_forward(q, k, v, g, beta, *, scale=None, initial_state=None, doc_ids=None, chunk=None, interpret=None):
    """q, k, g [B,T,H,K]; v [B,T,H,V]; beta [B,T,H]; initial_state [B,H,K,V] or None; doc_ids [B,T] document
    indices (0 for the first, counting up at each start) or None -> (o [B,T,H,V], final state [B,H,K,V] fp32).
    Forward only: no gradient is defined here."""
    tgt = platform.target()
    pref, warps = CHUNKS[tgt]
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk or min(pref, max(MIN_CHUNK[tgt], 1 << max(0, (T - 1).bit_length())))
    plan = Plan(t=T, t_pad=-(-T // C) * C, chunk=C, scale=float(K) ** -0.5 if scale is None else float(scale),
                has_segments=doc_ids is not None, interpret=platform.resolve_interpret(interpret), num_warps=warps)

    def heads_first(x):  # zero padding: a padded token has k = beta = g = 0, so it writes nothing and keeps S
        return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, plan.t_pad - T), (0, 0)))

    h0 = jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    doc = prev = None
    if doc_ids is not None:
        ids = jnp.pad(doc_ids.astype(jnp.int32), ((0, 0), (0, plan.t_pad - T)), mode="edge")
        doc, prev = ids[:, :, None], jnp.pad(ids[:, :-1], ((0, 0), (1, 0)))[:, :, None]
    o, final = forward(plan, heads_first(q), heads_first(k), heads_first(v), heads_first(g),
                       heads_first(beta[..., None]), h0, doc, prev)
    return jnp.swapaxes(o[:, :, :T], 1, 2), final


__all__ = ["CHUNKS", "kda_forward"]
