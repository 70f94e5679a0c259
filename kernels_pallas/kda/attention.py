"""`kda_attention`: the Pallas KDA kernels in the op's layout, the forward joined to its backward.

Moves heads before time and zero-pads T to whole chunks: a padded token has k = beta = g = 0, so it writes
nothing and keeps the state, and the final state is exact. The forward saves the state entering each chunk
([B, H, T/C, K, V] fp32) for the backward, which recomputes everything else per chunk.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.chunked import document_columns, heads_first, make_plan
from kernels_pallas.chunked import initial_state as initial_state_or_zeros
from kernels_pallas.kda.backward import backward
from kernels_pallas.kda.forward import forward

# (chunk, num_warps) per target: fla's chunk of 64 everywhere; unmeasured on GPU and TPU.
CHUNKS = {"cpu": (64, 4), "gpu": (64, 4), "tpu": (64, 4)}
MIN_CHUNK = {"cpu": 8, "gpu": 16, "tpu": 8}


def kda_attention(q, k, v, g, beta, *, scale=None, initial_state=None, doc_ids=None, chunk=None, interpret=None):
    """q, k, g [B,T,H,K]; v [B,T,H,V]; beta [B,T,H]; initial_state [B,H,K,V] or None; doc_ids [B,T] document
    indices (0 for the first, counting up at each start) or None -> (o [B,T,H,V] in v's dtype, final state
    [B,H,K,V] fp32), differentiable in q, k, v, g, beta and the initial state. Inputs are checked by the op."""
    plan = make_plan(q, chunks=CHUNKS, min_chunk=MIN_CHUNK, chunk=chunk, scale=scale,
                     has_segments=doc_ids is not None, interpret=interpret)
    B, _, H, K = q.shape
    h0 = initial_state_or_zeros(initial_state, B, H, K, v.shape[-1])
    doc, prev = document_columns(plan, doc_ids)
    o, final = _kda(plan, *(heads_first(plan, x) for x in (q, k, v, g, beta[..., None])), h0, doc, prev)
    return jnp.swapaxes(o[:, :, :plan.t], 1, 2), final


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kda(plan, q, k, v, g, beta, h0, doc, prev):
    return forward(plan, q, k, v, g, beta, h0, doc, prev)


def _kda_fwd(plan, q, k, v, g, beta, h0, doc, prev):
    o, final, states = forward(plan, q, k, v, g, beta, h0, doc, prev, save_states=True)
    return (o, final), (q, k, v, g, beta, states, doc, prev)


def _kda_bwd(plan, res, cts):
    q, k, v, g, beta, states, doc, prev = res
    do, dfinal = cts
    dq, dk, dv, dg, dbeta, dh0 = backward(plan, q, k, v, g, beta, states, do, dfinal.astype(jnp.float32), doc, prev)
    return dq, dk, dv, dg, dbeta, dh0, None, None


_kda.defvjp(_kda_fwd, _kda_bwd)
