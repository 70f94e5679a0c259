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

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.chunked import Plan, compiler_params, dot, head_gates, head_gates_row, iota, masked, masks

F32 = jnp.float32
# Triton warps: five [C, K]/[C, C] products spill 520 B at the plan's 4 (sm_90a, ptxas).
WARPS = 8


def _kernel(*refs, plan: Plan):
    q_ref, k_ref, v_ref, do_ref, s_ref, ds_ref, lam_ref = refs[:7]
    doc_ref, prev_ref = (refs[7], refs[8]) if plan.has_segments else (None, None)
    dq_ref, dk_ref, dlam_ref = refs[-3:]
    C, n = plan.chunk, pl.program_id(2)
    dtype = v_ref.dtype
    m = masks(plan, n, doc_ref[...], prev_ref[...]) if plan.has_segments else masks(plan, n)
    lam = lam_ref[...]
    G, Gamma = head_gates(plan, lam, n)
    pairs = iota((C, C), 0) >= iota((C, C), 1)
    if m.same is not None:
        pairs &= m.same
    decay = jnp.where(pairs, jnp.exp(jnp.where(pairs, G - head_gates_row(plan, lam, n), 0.0)), 0.0)
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    dA = (dot(do, v, contract=(1, 1)) * (plan.scale * decay)).astype(dtype)
    dq = dot(dA, k) + masked(m.carry_in, plan.scale * jnp.exp(G)) * dot(do, s_ref[...], contract=(1, 1))
    dk = dot(dA, q, contract=(0, 0)) + masked(m.to_exit, jnp.exp(Gamma - G)) * dot(v, ds_ref[...], contract=(1, 1))
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    t1 = (n * C + 1 + iota((C, 1), 0)).astype(F32)
    dlam_ref[...] = t1 * (jnp.sum(q.astype(F32) * dq, axis=1, keepdims=True)
                          - jnp.sum(k.astype(F32) * dk, axis=1, keepdims=True))


def query_key_grads(plan: Plan, *, q, k, v, do, states, dstates, lam, doc, prev):
    """q, k [B,H,Tp,K]; v, do [B,H,Tp,V]; states, dstates [B,H,N,K,V]; lam [H,1,1] -> (dq, dk in q's dtype,
    each token's log-decay gradient term [B,H,Tp,1] fp32)."""
    B, H, Tp, K = q.shape
    V = v.shape[-1]
    C, N = plan.chunk, plan.num_chunks
    row = lambda width: pl.BlockSpec((None, None, C, width), lambda b, h, n: (b, h, n, 0))  # noqa: E731
    state = pl.BlockSpec((None, None, None, K, V), lambda b, h, n: (b, h, n, 0, 0))
    in_specs = [row(K), row(K), row(V), row(V), state, state, pl.BlockSpec((None, 1, 1), lambda b, h, n: (h, 0, 0))]
    args = [q, k, v, do, states, dstates, lam]
    if plan.has_segments:
        in_specs += [pl.BlockSpec((None, C, 1), lambda b, h, n: (b, n, 0))] * 2
        args += [doc, prev]
    return pl.pallas_call(
        lambda *refs: _kernel(*refs, plan=plan), grid=(B, H, N), in_specs=in_specs,
        out_specs=(row(K), row(K), row(1)),
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct((B, H, Tp, 1), F32)),
        interpret=plan.interpret, name="lightning_query_key_grads",
        compiler_params=compiler_params(plan, 3, warps=WARPS),
    )(*args)
