"""Lightning's own kernel of the chunk pipeline: the query and key gradients, parallel over (batch, head, chunk).

With the state S entering the chunk and dS' the gradient of the state leaving it (both from the shared passes),
A = scale (q k^T) * decays and the decays of `chunked` (all matmuls on the inputs' dtype, fp32 accumulation):

    dA = scale (do v^T) * decays
    dq = dA k + scale exp(G) * (do S^T)          (where the incoming state reaches)
    dk = dA^T q + exp(Gamma - G) * (v dS'^T)     (where the key's write reaches the outgoing state)

The values' gradient comes from the reverse pass. Each token's share of the log decay's gradient,
(t + 1) (<q_t, dq_t> - <k_t, dk_t>) (see attention.py), is summed here from the fp32 dq and dk.
"""
from __future__ import annotations

import jax.numpy as jnp

from kernels_pallas.chunk_call import Operand, chunk_call, operand
from kernels_pallas.chunked import Plan, dot, head_gates, head_gates_row, iota, masked, masks

F32 = jnp.float32
# Triton warps: five [C, K]/[C, C] products spill 520 B at the plan's 4 (sm_90a, ptxas).
WARPS = 8


def query_key_grads(plan: Plan, *, q, k, v, do, states, dstates, lam, doc, prev):
    """q, k [B,H,Tp,K]; v, do [B,H,Tp,V]; states, dstates [B,H,N,K,V]; lam [H,1,1] -> (dq, dk in q's dtype,
    each token's log-decay gradient term [B,H,Tp,1] fp32)."""
    B, H, Tp, K = q.shape
    C = plan.chunk
    inputs = [operand("q", "row", q), operand("k", "row", k), operand("v", "row", v), operand("do", "row", do),
              operand("S", "states", states), operand("dS", "states", dstates), operand("lam", "head", lam)]
    if plan.has_segments:
        inputs += [operand("doc", "doc", doc), operand("prev", "doc", prev)]

    def body(at):
        n = at.n
        dtype = at.refs["v"].dtype
        m = masks(plan, n, at.load("doc"), at.load("prev")) if plan.has_segments else masks(plan, n)
        lam_ = at.load("lam")
        G, Gamma = head_gates(plan, lam_, n)
        pairs = iota((C, C), 0) >= iota((C, C), 1)
        if m.same is not None:
            pairs &= m.same
        decay = jnp.where(pairs, jnp.exp(jnp.where(pairs, G - head_gates_row(plan, lam_, n), 0.0)), 0.0)
        q_, k_, v_, do_ = at.load("q"), at.load("k"), at.load("v"), at.load("do")
        dA = (dot(do_, v_, contract=(1, 1)) * (plan.scale * decay)).astype(dtype)
        dq = dot(dA, k_) + masked(m.carry_in, plan.scale * jnp.exp(G)) * dot(do_, at.load("S"), contract=(1, 1))
        dk = (dot(dA, q_, contract=(0, 0))
              + masked(m.to_exit, jnp.exp(Gamma - G)) * dot(v_, at.load("dS"), contract=(1, 1)))
        at.store("dq", dq)
        at.store("dk", dk)
        t1 = (n * C + 1 + iota((C, 1), 0)).astype(F32)
        at.store("dlam", t1 * (jnp.sum(q_.astype(F32) * dq, axis=1, keepdims=True)
                               - jnp.sum(k_.astype(F32) * dk, axis=1, keepdims=True)))

    outputs = [Operand("dq", "row", q.shape, q.dtype), Operand("dk", "row", k.shape, k.dtype),
               Operand("dlam", "row", (B, H, Tp, 1), F32)]
    return tuple(chunk_call(plan, body, inputs=inputs, outputs=outputs, name="lightning_query_key_grads",
                            batch_heads=(B, H), V=v.shape[-1], warps=WARPS))
