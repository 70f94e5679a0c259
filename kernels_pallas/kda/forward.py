"""The KDA forward kernel: grid (batch, head), a loop over chunks inside with the fp32 state [K, V] as carry
(see chunk.py for the algebra of one chunk). Writes the output, the final state and, for the backward, the
state entering every chunk."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import platform
from kernels_pallas.chunked import Plan, dot
from kernels_pallas.kda.chunk import chunk_quantities

def _kernel(*refs, plan: Plan, save_states: bool):
    refs = list(refs)
    q_ref, k_ref, v_ref, g_ref, beta_ref, h0_ref = refs[:6]
    doc_ref, prev_ref = (refs[6], refs[7]) if plan.has_segments else (None, None)
    if save_states:
        o_ref, final_ref, states_ref = refs[-3:]
    else:
        (o_ref, final_ref), states_ref = refs[-2:], None
    C = plan.chunk

    def body(n, S):
        rows = pl.ds(pl.multiple_of(n * C, C), C)
        docs = (doc_ref[rows, :], prev_ref[rows, :]) if plan.has_segments else ()
        c = chunk_quantities(plan, n, q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], g_ref[rows, :],
                             beta_ref[rows, :], *docs)
        if states_ref is not None:
            states_ref[n] = S
        delta = c.U - dot(c.W, S)
        o_ref[rows, :] = (dot(c.q_in, S) + dot(c.aqk, delta)).astype(o_ref.dtype)
        return c.decay.reshape(-1, 1) * S + dot(c.k_exit, delta, contract=(0, 0))

    final_ref[...] = lax.fori_loop(0, plan.num_chunks, body, h0_ref[...].astype(jnp.float32))


def forward(plan: Plan, q, k, v, g, beta, h0, doc, prev, *, save_states=False):
    """q, k, g [B,H,Tp,K]; v [B,H,Tp,V]; beta [B,H,Tp,1]; h0 [B,H,K,V] fp32; doc, prev [B,Tp,1] int32 or None
    -> (o [B,H,Tp,V] in v's dtype, final state [B,H,K,V] fp32[, state entering each chunk [B,H,N,K,V] fp32])."""
    B, H, Tp, K = q.shape
    V = v.shape[-1]
    row = lambda width: pl.BlockSpec((None, None, Tp, width), lambda b, h: (b, h, 0, 0))  # noqa: E731
    state = pl.BlockSpec((None, None, K, V), lambda b, h: (b, h, 0, 0))
    in_specs = [row(K), row(K), row(V), row(K), row(1), state]
    args = [q, k, v, g, beta, h0]
    if plan.has_segments:
        in_specs += [pl.BlockSpec((None, Tp, 1), lambda b, h: (b, 0, 0))] * 2
        args += [doc, prev]
    out_shape = [jax.ShapeDtypeStruct((B, H, Tp, V), v.dtype), jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)]
    out_specs = [row(V), state]
    if save_states:
        N = plan.num_chunks
        out_shape.append(jax.ShapeDtypeStruct((B, H, N, K, V), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, N, K, V), lambda b, h: (b, h, 0, 0, 0)))
    return pl.pallas_call(
        functools.partial(_kernel, plan=plan, save_states=save_states), grid=(B, H), in_specs=in_specs,
        out_specs=tuple(out_specs),
        out_shape=tuple(out_shape), interpret=plan.interpret, name="kda_forward",
        compiler_params=platform.compiler_params(gpu=dict(num_warps=plan.num_warps, num_stages=2),
                                                 tpu=dict(dimension_semantics=("parallel", "parallel"))),
    )(*args)
