"""KDA's backward kernels beyond the shared passes: the chain rule back through one chunk, then through its scores.

With S the state entering the chunk, dS' the gradient of the state leaving it, v_new and dv_new from the passes
(see chunk_pipeline and intra.py for the forward), `chunk_grads` (one program per chunk, matmuls on the inputs'
dtype) takes the rest of the chunk's algebra back:

    dqg = do S^T, dkg = v_new dS'^T, dd = rowsum(S * dS'), dW = -dv_new S^T, dU = dv_new
    dT = dW (beta k_in)^T + dU (beta v)^T;  d(beta k_in) = T^T dW;  d(beta v) = T^T dU;  dL = -T^T dT T^T
    dAqk = do v_new^T (j <= i);  dAkk = beta dL (j < i)

and everything that does not pass through the score matrices: dv, dbeta, and the parts of dq, dk and of the
gates' gradient dG (G the within-chunk cumulative sums) from qg, k_in, kg and the chunk's total decay (added to the
chunk's last row, since every G sums the chunk's earlier gates).

`score_grads` (one program per 16-row sub-block I) takes dAqk and dAkk back to q, k and G, mirroring `scores`:
rows I's gradients from earlier columns, and columns I's from later rows, as matmuls with exponents relative to the
sub-block's first row (row role) or last row (column role); the 16x16 diagonal block a column at a time. The gates'
gradient collects each off-diagonal pair's term q_i k_j exp(G_i - G_j) at i (+) and j (-); diagonal pairs carry no
gate and are left out rather than added and cancelled, which would cost strong gates' small terms their precision.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.chunked import Plan, compiler_params, dot, first_row, iota, last_row, masked, masks
from kernels_pallas.kda.intra import column, masked_exp, row

F32 = jnp.float32
# Triton warps of the two kernels (sm_90a, ptxas): chunk_grads spills 4.8 KB at the plan's 4 warps, 396 B at 8
# and 788 B at 16 (128 registers a thread); score_grads 300 B at 4, none at 8.
CHUNK_GRADS_WARPS, SCORE_GRADS_WARPS = 8, 8


def _chunk_grads_kernel(*refs, plan: Plan):
    (q_ref, k_ref, v_ref, g_ref, beta_ref, t_ref, akk_ref, s_ref, ds_ref, vnew_ref, dvnew_ref,
     do_ref) = refs[:12]
    doc_ref, prev_ref = refs[12:14] if plan.has_segments else (None, None)
    dq_ref, dk_ref, dv_ref, dbeta_ref, dg_ref, dexit_ref, daqk_ref, dakk_ref, daqkt_ref, dakkt_ref = refs[-10:]
    C = plan.chunk
    dtype = v_ref.dtype
    m = masks(plan, pl.program_id(2), doc_ref[...], prev_ref[...]) if plan.has_segments else masks(plan, 0)
    i, j = iota((C, C), 0), iota((C, C), 1)
    causal, strict = i >= j, i > j
    if m.same is not None:
        causal, strict = causal & m.same, strict & m.same
    # In the order that keeps the fewest tiles live at once (Triton's registers): the [C, C] chain first.
    G = g_ref[...]
    beta = beta_ref[...].astype(F32)
    S = s_ref[...]
    v, v_new, dv_new, do = v_ref[...], vnew_ref[...], dvnew_ref[...], do_ref[...]
    # Through W = T beta k_in and U = T beta v, the inverse T = (I + L)^-1, and dW = -dv_new S^T.
    dW = -dot(dv_new, S, contract=(1, 1))
    k_in = masked(m.carry_in, k_ref[...].astype(F32) * jnp.exp(G))
    Bk, Bv = beta * k_in, beta * v.astype(F32)
    dT = dot(dW.astype(dtype), Bk.astype(dtype), contract=(1, 1)) + dot(dv_new, Bv.astype(dtype), contract=(1, 1))
    Td = t_ref[...].astype(dtype)
    dBk = dot(Td, dW.astype(dtype), contract=(0, 0))
    dBv = dot(Td, dv_new, contract=(0, 0))
    dL = jnp.where(strict, -dot(dot(Td, dT.astype(dtype), contract=(0, 0)).astype(dtype), Td, contract=(1, 1)), 0.0)
    dv_ref[...] = (beta * dBv).astype(dv_ref.dtype)
    dbeta_ref[...] = (jnp.sum(dBk * k_in, axis=1, keepdims=True) + jnp.sum(dBv * v.astype(F32), axis=1, keepdims=True)
                      + jnp.sum(dL * akk_ref[...], axis=1, keepdims=True))
    dAkk = beta * dL
    dakk_ref[...] = dAkk
    dakkt_ref[...] = dAkk.T
    dAqk = jnp.where(causal, dot(do, v_new, contract=(1, 1)), 0.0)
    daqk_ref[...] = dAqk
    daqkt_ref[...] = dAqk.T
    dk_in = beta * dBk
    # Through the output (qg = scale q exp(G)) and the outgoing state (kg = k exp(Gamma - G), d = exp(Gamma)).
    eG = jnp.exp(G)
    dqg = dot(do, S, contract=(1, 1))
    dq_ref[...] = masked(m.carry_in, dqg * eG)
    Gamma = last_row(G)
    dS = ds_ref[...]
    dd = jnp.sum(S.astype(F32) * dS.astype(F32), axis=1, keepdims=True).reshape(1, -1)
    # Every G_i sums the gates up to i; the chunk's total decay sums them all (added at the last row, so the
    # suffix sums hand it to every token); kg_j's exponent sums the gates after j (an exclusive prefix sum).
    dGamma = dd * masked(m.through, jnp.exp(Gamma))
    qg = masked(m.carry_in, (q_ref[...].astype(F32) * plan.scale) * eG)
    dg_ref[...] = dqg * qg + dk_in * k_in + jnp.where(iota((C, 1), 0) == C - 1, dGamma, 0.0)
    e_exit = masked(m.to_exit, jnp.exp(Gamma - G))
    dkg = dot(v_new, dS, contract=(1, 1))
    dk_ref[...] = masked(m.carry_in, dk_in * eG) + dkg * e_exit
    dexit_ref[...] = dkg * (k_ref[...].astype(F32) * e_exit)


def chunk_grads(plan: Plan, *, q, k, v, G, beta, T, akk, states, dstates, v_new, dv_new, do, doc, prev):
    """-> (dq~ [B,H,Tp,K] fp32 w.r.t. the scaled q, dk [.., K] fp32, dv [.., V] in v's dtype, dbeta [.., 1] fp32,
    dG [.., K] fp32 (for suffix sums), dG_exit [.., K] fp32 (for exclusive prefix sums), dAqk, dAkk and their
    transposes [.., C] fp32): the parts of the gradients that do not pass through the score matrices, and the
    score matrices' cotangents."""
    B, H, Tp, K = q.shape
    V = v.shape[-1]
    C = plan.chunk
    row_ = lambda width: pl.BlockSpec((None, None, C, width), lambda b, h, n: (b, h, n, 0))  # noqa: E731
    state = pl.BlockSpec((None, None, None, K, V), lambda b, h, n: (b, h, n, 0, 0))
    in_specs = [row_(K), row_(K), row_(V), row_(K), row_(1), row_(C), row_(C), state, state, row_(V), row_(V),
                row_(V)]
    args = [q, k, v, G, beta, T, akk, states, dstates, v_new, dv_new, do]
    if plan.has_segments:
        in_specs += [pl.BlockSpec((None, C, 1), lambda b, h, n: (b, n, 0))] * 2
        args += [doc, prev]
    f32 = lambda width: jax.ShapeDtypeStruct((B, H, Tp, width), F32)  # noqa: E731
    out_shape = (f32(K), f32(K), jax.ShapeDtypeStruct(v.shape, v.dtype), f32(1), f32(K), f32(K), f32(C), f32(C),
                 f32(C), f32(C))
    out_specs = (row_(K), row_(K), row_(V), row_(1), row_(K), row_(K), row_(C), row_(C), row_(C), row_(C))
    return pl.pallas_call(
        lambda *refs: _chunk_grads_kernel(*refs, plan=plan), grid=(B, H, plan.num_chunks), in_specs=in_specs,
        out_specs=out_specs, out_shape=out_shape, interpret=plan.interpret, name="kda_chunk_grads",
        compiler_params=compiler_params(plan, 3, warps=CHUNK_GRADS_WARPS),
    )(*args)


def _score_grads_kernel(qi_ref, ki_ref, gi_ref, q_ref, k_ref, g_ref, daqk_ref, dakk_ref, daqkt_ref, dakkt_ref,
                        dq_ref, dk_ref, dg_ref, *, plan: Plan):
    C, BC = plan.chunk, plan.sub
    dtype = q_ref.dtype
    r = pl.program_id(3) * BC
    qi, ki, Gi = qi_ref[...].astype(F32) * plan.scale, ki_ref[...].astype(F32), gi_ref[...]
    q, k, G = q_ref[...].astype(F32) * plan.scale, k_ref[...].astype(F32), g_ref[...]
    daqk, dakk = daqk_ref[...], dakk_ref[...]
    rows_c = iota((C, 1), 0)
    cols = iota((BC, C), 1)
    # Row role: rows I against earlier columns, exponents relative to row r.
    Gr = first_row(Gi)
    earlier = rows_c < r
    ks = (masked_exp(earlier, Gr - G) * k).astype(dtype)
    before = cols < r
    ei = jnp.exp(Gi - Gr)
    dq = ei * dot(jnp.where(before, daqk, 0.0).astype(dtype), ks)
    dk_row = ei * dot(jnp.where(before, dakk, 0.0).astype(dtype), ks)
    # Column role: columns I against later rows, exponents relative to row r + BC - 1.
    Gl = last_row(Gi)
    later = rows_c >= r + BC
    el = masked_exp(later, G - Gl)
    after = cols >= r + BC
    dk_col = jnp.exp(Gl - Gi) * (dot(jnp.where(after, daqkt_ref[...], 0.0).astype(dtype), (el * q).astype(dtype))
                                 + dot(jnp.where(after, dakkt_ref[...], 0.0).astype(dtype), (el * k).astype(dtype)))
    dG = qi * dq + ki * dk_row - ki * dk_col
    # The diagonal block, a column at a time.
    i = iota((BC, 1), 0)
    rows_k = iota((BC, Gi.shape[1]), 0)

    def diagonal(j, acc):
        dq, dk, dG = acc
        kj, Gj = row(ki, j), row(Gi, j)
        e = masked_exp(i >= j, Gi - Gj)
        a, b = column(daqk, r + j), column(dakk, r + j)
        dq = dq + a * kj * e
        both = (a * qi + b * ki) * e
        dk = dk + b * kj * e + jnp.where(rows_k == j, jnp.sum(both, axis=0, keepdims=True), 0.0)
        term = jnp.where(i > j, both, 0.0) * kj
        dG = dG + term - jnp.where(rows_k == j, jnp.sum(term, axis=0, keepdims=True), 0.0)
        return dq, dk, dG

    dq, dk, dG = lax.fori_loop(0, BC, diagonal, (dq, dk_row + dk_col, dG))
    dq_ref[...] = dq
    dk_ref[...] = dk
    dg_ref[...] = dG


def score_grads(plan: Plan, *, q, k, G, daqk, dakk, daqkt, dakkt):
    """dAqk, dAkk (and their transposes) [B,H,Tp,C] fp32 -> their parts of (dq~ w.r.t. the scaled q, dk, dG)
    [B,H,Tp,K] fp32."""
    B, H, Tp, K = q.shape
    C, BC, S = plan.chunk, plan.sub, plan.subs
    sub = lambda width: pl.BlockSpec((None, None, BC, width), lambda b, h, n, i: (b, h, n * S + i, 0))  # noqa
    whole = pl.BlockSpec((None, None, C, K), lambda b, h, n, i: (b, h, n, 0))
    out = jax.ShapeDtypeStruct((B, H, Tp, K), F32)
    return pl.pallas_call(
        lambda *refs: _score_grads_kernel(*refs, plan=plan), grid=(B, H, plan.num_chunks, S),
        in_specs=[sub(K), sub(K), sub(K), whole, whole, whole, sub(C), sub(C), sub(C), sub(C)],
        out_specs=(sub(K), sub(K), sub(K)), out_shape=(out, out, out), interpret=plan.interpret,
        name="kda_score_grads", compiler_params=compiler_params(plan, 4, warps=SCORE_GRADS_WARPS),
    )(q, k, G, q, k, G, daqk, dakk, daqkt, dakkt)
