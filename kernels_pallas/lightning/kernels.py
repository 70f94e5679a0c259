"""The lightning kernels: grid (batch, head), a loop over chunks inside with the fp32 state [K, V] as carry.

- forward: per chunk, the decayed causal quadratic form inside the chunk plus the incoming state read by the
  decayed queries; then the state moves on. Writes the output, the final state and (for the backward) the
  state entering every chunk.
- backward: chunks in reverse, carrying the state's gradient dS; per chunk, dq from the intra-chunk form and
  the saved incoming state, dk and dv from the intra-chunk form and dS, then dS moves to the chunk's start.
  The gradient of dS after chunk 0 is the initial state's.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import platform
from kernels_pallas.chunked import Plan, dot
from kernels_pallas.lightning.chunk import decays


def _doc_cols(plan, doc_ref, prev_ref, rows):
    if not plan.has_segments:
        return None, None
    return doc_ref[rows, :], prev_ref[rows, :]


def _forward_kernel(*refs, plan: Plan):
    refs = list(refs)
    q_ref, k_ref, v_ref, lam_ref, h0_ref = refs[:5]
    doc_ref, prev_ref = (refs[5], refs[6]) if plan.has_segments else (None, None)
    o_ref, final_ref, states_ref = refs[-3:]
    C = plan.chunk
    lam = lam_ref[...]

    def body(n, S):
        rows = pl.ds(pl.multiple_of(n * C, C), C)
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        d = decays(plan, lam, n, *_doc_cols(plan, doc_ref, prev_ref, rows))
        states_ref[n] = S
        scores = dot(q, k, contract=(1, 1)) * d.intra * plan.scale
        o = dot(scores.astype(v.dtype), v) + dot(q.astype(jnp.float32) * (d.query * plan.scale), S)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return d.carry * S + dot((k * d.key).astype(v.dtype), v, contract=(0, 0))

    final_ref[...] = lax.fori_loop(0, plan.num_chunks, body, h0_ref[...].astype(jnp.float32))


def _backward_kernel(*refs, plan: Plan):
    refs = list(refs)
    q_ref, k_ref, v_ref, lam_ref, states_ref, do_ref, dfinal_ref = refs[:7]
    doc_ref, prev_ref = (refs[7], refs[8]) if plan.has_segments else (None, None)
    dq_ref, dk_ref, dv_ref, dlam_ref, dh0_ref = refs[-5:]
    C, N = plan.chunk, plan.num_chunks
    lam = lam_ref[...]

    def body(r, dS):
        n = N - 1 - r
        rows = pl.ds(pl.multiple_of(n * C, C), C)
        q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        d = decays(plan, lam, n, *_doc_cols(plan, doc_ref, prev_ref, rows))
        S = states_ref[n]
        dp = dot(do, v, contract=(1, 1)) * d.intra * plan.scale             # d(loss)/d(q_i . k_j)
        a = dot(q, k, contract=(1, 1)) * d.intra * plan.scale               # the intra-chunk weights
        dq = dot(dp.astype(k.dtype), k) + d.query * plan.scale * dot(do.astype(jnp.float32), S, contract=(1, 1))
        dk = dot(dp.astype(q.dtype), q, contract=(0, 0)) + d.key * dot(v.astype(jnp.float32), dS, contract=(1, 1))
        dv = dot(a.astype(do.dtype), do, contract=(0, 0)) + d.key * dot(k.astype(jnp.float32), dS)
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        # Each token's share of the decay's gradient, from the fp32 gradients (see attention.py).
        t1 = (n * C + 1 + lax.broadcasted_iota(jnp.int32, (C, 1), 0)).astype(jnp.float32)
        dlam_ref[rows, :] = t1 * (jnp.sum(q.astype(jnp.float32) * dq, axis=1, keepdims=True)
                                  - jnp.sum(k.astype(jnp.float32) * dk, axis=1, keepdims=True))
        q_in = (q.astype(jnp.float32) * (d.query * plan.scale))
        return d.carry * dS + dot(q_in, do.astype(jnp.float32), contract=(0, 0))

    dh0_ref[...] = lax.fori_loop(0, N, body, dfinal_ref[...].astype(jnp.float32))


def _params(plan):
    return platform.compiler_params(gpu=dict(num_warps=plan.num_warps, num_stages=2),
                                    tpu=dict(dimension_semantics=("parallel", "parallel")))


def _row(length, width):
    return pl.BlockSpec((None, None, length, width), lambda b, h: (b, h, 0, 0))


def _doc_specs(plan):
    spec = pl.BlockSpec((None, plan.t_pad, 1), lambda b, h: (b, 0, 0))
    return [spec, spec] if plan.has_segments else []


def forward(plan: Plan, q, k, v, lam, h0, doc, prev):
    """q, k [B,H,Tp,K]; v [B,H,Tp,V]; lam [H,1,1] fp32; h0 [B,H,K,V] fp32; doc, prev [B,Tp,1] int32 or None
    -> (o [B,H,Tp,V], final state [B,H,K,V] fp32, incoming states [B,H,N,K,V] fp32)."""
    B, H, Tp, K = q.shape
    V = v.shape[-1]
    N = plan.num_chunks
    state = pl.BlockSpec((None, None, K, V), lambda b, h: (b, h, 0, 0))
    in_specs = [_row(Tp, K), _row(Tp, K), _row(Tp, V), pl.BlockSpec((None, 1, 1), lambda b, h: (h, 0, 0)), state]
    in_specs += _doc_specs(plan)
    out_shape = (jax.ShapeDtypeStruct((B, H, Tp, V), v.dtype), jax.ShapeDtypeStruct((B, H, K, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, H, N, K, V), jnp.float32))
    out_specs = (_row(Tp, V), state, pl.BlockSpec((None, None, N, K, V), lambda b, h: (b, h, 0, 0, 0)))
    args = [q, k, v, lam, h0] + ([doc, prev] if plan.has_segments else [])
    return pl.pallas_call(functools.partial(_forward_kernel, plan=plan), grid=(B, H), in_specs=in_specs,
                          out_specs=out_specs, out_shape=out_shape, interpret=plan.interpret,
                          compiler_params=_params(plan), name="lightning_forward")(*args)


def backward(plan: Plan, q, k, v, lam, states, do, dfinal, doc, prev):
    """-> (dq, dk, dv in the inputs' dtypes, per-token decay gradient [B,H,Tp,1] fp32, dh0 [B,H,K,V] fp32)."""
    B, H, Tp, K = q.shape
    V = v.shape[-1]
    N = plan.num_chunks
    state = pl.BlockSpec((None, None, K, V), lambda b, h: (b, h, 0, 0))
    in_specs = [_row(Tp, K), _row(Tp, K), _row(Tp, V), pl.BlockSpec((None, 1, 1), lambda b, h: (h, 0, 0)),
                pl.BlockSpec((None, None, N, K, V), lambda b, h: (b, h, 0, 0, 0)), _row(Tp, V), state]
    in_specs += _doc_specs(plan)
    out_shape = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((B, H, Tp, 1), jnp.float32),
                 jax.ShapeDtypeStruct((B, H, K, V), jnp.float32))
    out_specs = (_row(Tp, K), _row(Tp, K), _row(Tp, V), _row(Tp, 1), state)
    args = [q, k, v, lam, states, do, dfinal] + ([doc, prev] if plan.has_segments else [])
    return pl.pallas_call(functools.partial(_backward_kernel, plan=plan), grid=(B, H), in_specs=in_specs,
                          out_specs=out_specs, out_shape=out_shape, interpret=plan.interpret,
                          compiler_params=_params(plan), name="lightning_backward")(*args)
