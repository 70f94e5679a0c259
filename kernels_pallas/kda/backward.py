"""The KDA backward kernel: grid (batch, head), the chunks in reverse with the state's gradient dS [K, V] as
carry. Each chunk's forward quantities are recomputed from its inputs and the saved state entering it
(`chunk.chunk_quantities`); then, with delta = U - W S and the chunk's output and outgoing state as in
chunk.py, the chain rule runs back through the outgoing state, the output, the two triangular solves (their
gradients are solves with (I + L)^T), the decayed score matrices (`chunk.score_grads`) and the gate sums. The
gates' gradient is the reverse cumulative sum of G's, plus what the within-chunk suffix sums and the chunk's
total decay add. dS after chunk 0 is the initial state's gradient.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import platform
from kernels_pallas.chunked import Plan, dot
from kernels_pallas.kda.chunk import (chunk_quantities, cumulative, masked, score_grads,
                                      solve_unit_lower_transposed)


def _kernel(*refs, plan: Plan):
    refs = list(refs)
    q_ref, k_ref, v_ref, g_ref, beta_ref, states_ref, do_ref, dfinal_ref = refs[:8]
    doc_ref, prev_ref = (refs[8], refs[9]) if plan.has_segments else (None, None)
    dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref, dh0_ref = refs[-6:]
    C, N = plan.chunk, plan.num_chunks
    i = lax.broadcasted_iota(jnp.int32, (C, 1), 0)
    j = lax.broadcasted_iota(jnp.int32, (1, C), 1)

    def body(r, dS_out):
        n = N - 1 - r
        rows = pl.ds(pl.multiple_of(n * C, C), C)
        docs = (doc_ref[rows, :], prev_ref[rows, :]) if plan.has_segments else ()
        c = chunk_quantities(plan, n, q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], g_ref[rows, :],
                             beta_ref[rows, :], *docs)
        S = states_ref[n]
        do = do_ref[rows, :].astype(jnp.float32)
        delta = c.U - dot(c.W, S)
        pairs_qk = i >= j if c.same is None else (i >= j) & c.same
        pairs_kk = i > j if c.same is None else (i > j) & c.same

        # Through the outgoing state and the output.
        d_delta = dot(c.aqk, do, contract=(0, 0)) + dot(c.k_exit, dS_out)
        dS_in = (dot(c.q_in, do, contract=(0, 0)) + c.decay.reshape(-1, 1) * dS_out
                 - dot(c.W, d_delta, contract=(0, 0)))
        d_aqk = jnp.where(pairs_qk, dot(do, delta, contract=(1, 1)), 0.0)
        d_q_in = dot(do, S, contract=(1, 1))
        d_k_exit = dot(delta, dS_out, contract=(1, 1))
        d_decay = jnp.sum(S * dS_out, axis=1, keepdims=True).reshape(1, -1)          # [1, K]

        # Through U = (I+L)^-1 beta v and W = (I+L)^-1 beta k_in: dB = (I+L)^-T dX, dL = -dB X^T.
        d_bv = solve_unit_lower_transposed(c.beta * c.akk, d_delta)
        d_bk = solve_unit_lower_transposed(c.beta * c.akk, -dot(d_delta, S, contract=(1, 1)))
        d_L = jnp.where(pairs_kk, -(dot(d_bv, c.U, contract=(1, 1)) + dot(d_bk, c.W, contract=(1, 1))), 0.0)
        d_k_in = masked(c.carry_in, c.beta * d_bk)

        # Through the decayed scores and the exponentials.
        dq_a, dk_row, dk_col, dG_scores = score_grads(c.q, c.k, c.G, d_aqk, c.beta * d_L)
        e_g = jnp.exp(c.G)
        e_suffix = jnp.exp(cumulative(c.g, reverse=True))
        dq = dq_a + masked(c.carry_in, d_q_in * e_g)
        dk = dk_row + dk_col + d_k_in * e_g + masked(c.to_exit, d_k_exit * e_suffix)
        dv = c.beta * d_bv
        dbeta = (jnp.sum(d_bv * c.v, axis=1, keepdims=True) + jnp.sum(d_bk * c.k_in, axis=1, keepdims=True)
                 + jnp.sum(d_L * c.akk, axis=1, keepdims=True))
        dG = dG_scores + d_q_in * c.q_in + d_k_in * c.k_in
        d_suffix = d_k_exit * c.k_exit
        dg = (dG + cumulative(dG, reverse=True) + cumulative(d_suffix, inclusive=False)
              + d_decay * c.decay)
        dq_ref[rows, :] = (dq * plan.scale).astype(dq_ref.dtype)
        dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        dg_ref[rows, :] = dg.astype(dg_ref.dtype)
        dbeta_ref[rows, :] = dbeta.astype(dbeta_ref.dtype)
        return dS_in

    dh0_ref[...] = lax.fori_loop(0, N, body, dfinal_ref[...].astype(jnp.float32))


def backward(plan: Plan, q, k, v, g, beta, states, do, dfinal, doc, prev):
    """Inputs as `forward`'s, plus the saved states [B,H,N,K,V], the output's cotangent [B,H,Tp,V] and the final
    state's [B,H,K,V] -> (dq, dk, dv, dg, dbeta [B,H,Tp,1] in the inputs' dtypes, dh0 [B,H,K,V] fp32)."""
    B, H, Tp, K = q.shape
    V = v.shape[-1]
    N = plan.num_chunks
    row = lambda width: pl.BlockSpec((None, None, Tp, width), lambda b, h: (b, h, 0, 0))  # noqa: E731
    state = pl.BlockSpec((None, None, K, V), lambda b, h: (b, h, 0, 0))
    in_specs = [row(K), row(K), row(V), row(K), row(1),
                pl.BlockSpec((None, None, N, K, V), lambda b, h: (b, h, 0, 0, 0)), row(V), state]
    args = [q, k, v, g, beta, states, do, dfinal]
    if plan.has_segments:
        in_specs += [pl.BlockSpec((None, Tp, 1), lambda b, h: (b, 0, 0))] * 2
        args += [doc, prev]
    out_shape = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, g, beta)) + (
        jax.ShapeDtypeStruct((B, H, K, V), jnp.float32),)
    out_specs = (row(K), row(K), row(V), row(K), row(1), state)
    return pl.pallas_call(
        functools.partial(_kernel, plan=plan), grid=(B, H), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, interpret=plan.interpret, name="kda_backward",
        compiler_params=platform.compiler_params(gpu=dict(num_warps=plan.num_warps, num_stages=2),
                                                 tpu=dict(dimension_semantics=("parallel", "parallel"))),
    )(*args)
