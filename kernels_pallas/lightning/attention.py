"""`lightning_attention`: the lightning chunk pipeline in the op's layout, the forward joined to its backward.

Forward: the shared state pass (the state entering each chunk) and the shared output kernel. Backward: the state
pass again (chunk states are recomputed, not kept from the forward), the shared reverse pass (the state's gradient
per chunk and dv) and lightning's query/key gradient kernel. The forward keeps only its inputs for the backward.

Moves heads before time and zero-pads T to whole chunks (padded keys are zero and excluded from the state by
position, so the final state is exact). The gradient of the per-head log-decay comes from the input gradients:
every decay factor is exp(lambda (t - s)) between a query (or the state read at t) and a key s (or the initial
state, at -1), so

    dL/dlambda = sum_t (t + 1) (<q_t, dq_t> - <k_t, dk_t>) + T <S_T, dS_T>

(the query side of each factor counts t + 1, its key side s + 1, the final state T), with no decay derivative
inside the kernels. The query/key kernel sums each token's term from its fp32 dq and dk, before they are rounded
to the input dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.chunk_pipeline import LIGHTNING, output, reverse_pass, state_pass
from kernels_pallas.chunked import document_columns, heads_first, make_plan
from kernels_pallas.chunked import initial_state as initial_state_or_zeros
from kernels_pallas.lightning.intra import query_key_grads

# (chunk, num_warps) per target. cpu: interpret mode; gpu: fla's chunk; tpu: a full lane tile. gpu and tpu
# are unmeasured starting points.
CHUNKS = {"cpu": (64, 4), "gpu": (64, 4), "tpu": (128, 4)}
# The smallest chunk: Triton's dots need 16 rows, TPU's sublane tiles 8.
MIN_CHUNK = {"cpu": 8, "gpu": 16, "tpu": 8}
# V columns per program of the sequential passes: TPU's lane tile; on GPU, fla's choice for its state kernel.
BLOCK_V = {"cpu": 32, "gpu": 32, "tpu": 128}


def lightning_attention(q, k, v, log_decay, *, scale=None, initial_state=None, doc_ids=None, chunk=None,
                        interpret=None, drivers=None):
    """q, k [B,T,H,K]; v [B,T,H,V]; log_decay [H] (<= 0); initial_state [B,H,K,V] or None; doc_ids [B,T] int
    document indices (0 for the first document, counting up at each start; None: one document).
    Returns (o [B,T,H,V] in v's dtype, final state [B,H,K,V] fp32). Inputs are checked by the op's API.
    drivers: (parallel, sequential) kernels' drivers, "grid" | "loop" each (default the target's; see
    chunk_call.py)."""
    plan = make_plan(q, v, chunks=CHUNKS, min_chunk=MIN_CHUNK, block_v=BLOCK_V, chunk=chunk, scale=scale,
                     has_segments=doc_ids is not None, interpret=interpret, drivers=drivers)
    B, _, H, K = q.shape
    h0 = initial_state_or_zeros(initial_state, B, H, K, v.shape[-1])
    doc, prev = document_columns(plan, doc_ids)
    o, final = _lightning(plan, heads_first(plan, q), heads_first(plan, k), heads_first(plan, v),
                          jnp.asarray(log_decay, jnp.float32), h0, doc, prev)
    return jnp.swapaxes(o[:, :, :plan.t], 1, 2), final


def _forward(plan, q, k, v, lam, h0, doc, prev):
    states, _, final = state_pass(plan, LIGHTNING, k=k, U=v, W=None, gate=lam, h0=h0, doc=doc, prev=prev)
    o = output(plan, LIGHTNING, q=q, k=k, v_new=v, states=states, A=None, gate=lam, doc=doc, prev=prev)
    return o, final, states


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lightning(plan, q, k, v, log_decay, h0, doc, prev):
    o, final, _ = _forward(plan, q, k, v, log_decay[:, None, None], h0, doc, prev)
    return o, final


def _lightning_fwd(plan, q, k, v, log_decay, h0, doc, prev):
    o, final, _ = _forward(plan, q, k, v, log_decay[:, None, None], h0, doc, prev)
    return (o, final), (q, k, v, log_decay, h0, final, doc, prev)


def _lightning_bwd(plan, res, cts):
    q, k, v, log_decay, h0, final, doc, prev = res
    do, dfinal = cts
    lam = log_decay[:, None, None]
    do = do.astype(v.dtype)
    states, _, _ = state_pass(plan, LIGHTNING, k=k, U=v, W=None, gate=lam, h0=h0, doc=doc, prev=prev)
    dstates, dv, dh0 = reverse_pass(plan, LIGHTNING, q=q, k=k, W=None, A=None, gate=lam, do=do,
                                    dfinal=dfinal.astype(jnp.float32), doc=doc, prev=prev)
    dq, dk, dlam_tokens = query_key_grads(plan, q=q, k=k, v=v, do=do, states=states, dstates=dstates, lam=lam,
                                          doc=doc, prev=prev)
    dlam = jnp.sum(dlam_tokens, axis=(0, 2, 3)) + plan.t * jnp.sum(final * dfinal, axis=(0, 2, 3))
    return dq, dk, dv, dlam.astype(log_decay.dtype), dh0, None, None


_lightning.defvjp(_lightning_fwd, _lightning_bwd)
