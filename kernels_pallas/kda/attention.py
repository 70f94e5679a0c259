"""`kda_attention`: the KDA chunk pipeline in the op's layout, the forward joined to its backward.

Forward (five kernels, each parallel over chunks except the state pass): the gates' within-chunk cumulative sums
(an XLA cumsum), `intra.scores` (Aqk, Akk per 16-row sub-block), `intra.solve` (the WY form: W, U), the shared state
pass (the state entering each chunk and v_new = U - W S) and the shared output kernel. Backward: the same up to the
state pass (recomputed; the forward keeps only its inputs), the shared reverse pass (the state's gradient per chunk,
dv_new), `gradients.chunk_grads` and `gradients.score_grads`; the gates' gradient is the within-chunk suffix sum of
dG plus the exclusive prefix sum of the exit decays' part.

Moves heads before time and zero-pads T to whole chunks: a padded token has k = beta = g = 0, so it writes nothing
and keeps the state, and the final state is exact.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.chunk_pipeline import KDA, output, reverse_pass, state_pass
from kernels_pallas.chunked import (chunk_prefix_sums, chunk_suffix_sums, chunk_sums, document_columns, heads_first,
                                   make_plan)
from kernels_pallas.chunked import initial_state as initial_state_or_zeros
from kernels_pallas.kda.gradients import chunk_grads, score_grads
from kernels_pallas.kda.intra import scores, solve

# (chunk, num_warps) per target: fla's chunk of 64 everywhere; unmeasured on GPU and TPU.
CHUNKS = {"cpu": (64, 4), "gpu": (64, 4), "tpu": (64, 4)}
MIN_CHUNK = {"cpu": 8, "gpu": 16, "tpu": 16}
# V columns per program of the sequential passes: TPU's lane tile; on GPU, fla's choice for its state kernel.
BLOCK_V = {"cpu": 32, "gpu": 32, "tpu": 128}


def kda_attention(q, k, v, g, beta, *, scale=None, initial_state=None, doc_ids=None, chunk=None, interpret=None,
                  drivers=None):
    """q, k, g [B,T,H,K]; v [B,T,H,V]; beta [B,T,H]; initial_state [B,H,K,V] or None; doc_ids [B,T] document
    indices (0 for the first, counting up at each start) or None -> (o [B,T,H,V] in v's dtype, final state
    [B,H,K,V] fp32), differentiable in q, k, v, g, beta and the initial state. Inputs are checked by the op.
    drivers: (parallel, sequential) kernels' drivers, "grid" | "loop" each (default the target's; see
    chunk_call.py)."""
    plan = make_plan(q, v, chunks=CHUNKS, min_chunk=MIN_CHUNK, block_v=BLOCK_V, chunk=chunk, scale=scale,
                     has_segments=doc_ids is not None, interpret=interpret, drivers=drivers)
    B, _, H, K = q.shape
    h0 = initial_state_or_zeros(initial_state, B, H, K, v.shape[-1])
    doc, prev = document_columns(plan, doc_ids)
    o, final = _kda(plan, *(heads_first(plan, x) for x in (q, k, v, g, beta[..., None])), h0, doc, prev)
    return jnp.swapaxes(o[:, :, :plan.t], 1, 2), final


def _through_state_pass(plan, q, k, v, g, beta, h0, doc, prev, *, with_inverse):
    G = chunk_sums(plan, g)
    aqk, akk = scores(plan, q=q, k=k, G=G, doc=doc, prev=prev)
    W, U, *T = solve(plan, akk=akk, beta=beta, k=k, v=v, G=G, doc=doc, prev=prev, with_inverse=with_inverse)
    states, v_new, final = state_pass(plan, KDA, k=k, U=U, W=W, gate=G, h0=h0, doc=doc, prev=prev)
    return dict(G=G, aqk=aqk, akk=akk, W=W, T=T[0] if T else None, states=states, v_new=v_new, final=final)


def _forward(plan, q, k, v, g, beta, h0, doc, prev):
    x = _through_state_pass(plan, q, k, v, g, beta, h0, doc, prev, with_inverse=False)
    o = output(plan, KDA, q=q, k=k, v_new=x["v_new"], states=x["states"], A=x["aqk"], gate=x["G"], doc=doc,
               prev=prev)
    return o, x["final"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kda(plan, q, k, v, g, beta, h0, doc, prev):
    return _forward(plan, q, k, v, g, beta, h0, doc, prev)


def _kda_fwd(plan, q, k, v, g, beta, h0, doc, prev):
    return _forward(plan, q, k, v, g, beta, h0, doc, prev), (q, k, v, g, beta, h0, doc, prev)


def _kda_bwd(plan, res, cts):
    q, k, v, g, beta, h0, doc, prev = res
    do, dfinal = cts
    do = do.astype(v.dtype)
    x = _through_state_pass(plan, q, k, v, g, beta, h0, doc, prev, with_inverse=True)
    G = x["G"]
    dstates, dv_new, dh0 = reverse_pass(plan, KDA, q=q, k=k, W=x["W"], A=x["aqk"], gate=G, do=do,
                                        dfinal=dfinal.astype(jnp.float32), doc=doc, prev=prev)
    dq_c, dk_c, dv, dbeta, dG_c, dG_exit, daqk, dakk, daqkt, dakkt = chunk_grads(
        plan, q=q, k=k, v=v, G=G, beta=beta, T=x["T"], akk=x["akk"], states=x["states"], dstates=dstates,
        v_new=x["v_new"], dv_new=dv_new, do=do, doc=doc, prev=prev)
    dq_s, dk_s, dG_s = score_grads(plan, q=q, k=k, G=G, daqk=daqk, dakk=dakk, daqkt=daqkt, dakkt=dakkt)
    dq = (dq_c + dq_s) * plan.scale
    dg = chunk_suffix_sums(plan, dG_c + dG_s) + chunk_prefix_sums(plan, dG_exit)
    return (dq.astype(q.dtype), (dk_c + dk_s).astype(k.dtype), dv, dg.astype(g.dtype), dbeta.astype(beta.dtype),
            dh0, None, None)


_kda.defvjp(_kda_fwd, _kda_bwd)
