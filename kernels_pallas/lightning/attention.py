"""`lightning_attention`: the Pallas lightning kernels in the op's layout, joined to their backward.

Moves heads before time and zero-pads T to whole chunks (padded keys are zero and excluded from the state by
position, so the final state is exact). The gradient of the per-head log-decay comes from the input gradients:
every decay factor is exp(lambda (t - s)) between a query (or the state read at t) and a key s (or the initial
state, at -1), so

    dL/dlambda = sum_t (t + 1) (<q_t, dq_t> - <k_t, dk_t>) + T <S_T, dS_T>

(the query side of each factor counts t + 1, its key side s + 1, the final state T), with no decay
derivative inside the kernels. The backward kernel sums each token's term from its fp32 dq and dk, before they
are rounded to the input dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.chunked import document_columns, heads_first, make_plan
from kernels_pallas.chunked import initial_state as initial_state_or_zeros
from kernels_pallas.lightning.kernels import backward, forward

# (chunk, num_warps) per target. cpu: interpret mode; gpu: fla's chunk; tpu: a full lane tile. gpu and tpu
# are unmeasured starting points.
CHUNKS = {"cpu": (64, 4), "gpu": (64, 4), "tpu": (128, 4)}
# The smallest chunk: Triton's dots need 16 rows, TPU's sublane tiles 8.
MIN_CHUNK = {"cpu": 8, "gpu": 16, "tpu": 8}


def lightning_attention(q, k, v, log_decay, *, scale=None, initial_state=None, doc_ids=None, chunk=None,
                        interpret=None):
    """q, k [B,T,H,K]; v [B,T,H,V]; log_decay [H] (<= 0); initial_state [B,H,K,V] or None; doc_ids [B,T] int
    document indices (0 for the first document, counting up at each start; None: one document).
    Returns (o [B,T,H,V] in v's dtype, final state [B,H,K,V] fp32). Inputs are checked by the op's API."""
    plan = make_plan(q, chunks=CHUNKS, min_chunk=MIN_CHUNK, chunk=chunk, scale=scale,
                     has_segments=doc_ids is not None, interpret=interpret)
    B, _, H, K = q.shape
    h0 = initial_state_or_zeros(initial_state, B, H, K, v.shape[-1])
    doc, prev = document_columns(plan, doc_ids)
    o, final = _lightning(plan, heads_first(plan, q), heads_first(plan, k), heads_first(plan, v),
                          jnp.asarray(log_decay, jnp.float32), h0, doc, prev)
    return jnp.swapaxes(o[:, :, :plan.t], 1, 2), final


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lightning(plan, q, k, v, log_decay, h0, doc, prev):
    o, final, _ = forward(plan, q, k, v, log_decay[:, None, None], h0, doc, prev)
    return o, final


def _lightning_fwd(plan, q, k, v, log_decay, h0, doc, prev):
    o, final, states = forward(plan, q, k, v, log_decay[:, None, None], h0, doc, prev)
    return (o, final), (q, k, v, log_decay, states, final, doc, prev)


def _lightning_bwd(plan, res, cts):
    q, k, v, log_decay, states, final, doc, prev = res
    do, dfinal = cts
    dq, dk, dv, dlam_tokens, dh0 = backward(plan, q, k, v, log_decay[:, None, None], states, do.astype(v.dtype),
                                            dfinal.astype(jnp.float32), doc, prev)
    dlam = jnp.sum(dlam_tokens, axis=(0, 2, 3)) + plan.t * jnp.sum(final * dfinal, axis=(0, 2, 3))
    return dq, dk, dv, dlam.astype(log_decay.dtype), dh0, None, None


_lightning.defvjp(_lightning_fwd, _lightning_bwd)
