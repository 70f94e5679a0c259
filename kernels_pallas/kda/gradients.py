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

import jax.numpy as jnp
from jax import lax

from kernels_pallas.chunk_call import Operand, chunk_call, operand
from kernels_pallas.chunked import Plan, dot, first_row, iota, last_row, masked, masks
from kernels_pallas.kda.intra import column, masked_exp, row

F32 = jnp.float32
# Triton warps of the two kernels (sm_90a, ptxas): chunk_grads spills 4.8 KB at the plan's 4 warps, 396 B at 8
# and 788 B at 16 (128 registers a thread); score_grads 300 B at 4, none at 8.
CHUNK_GRADS_WARPS, SCORE_GRADS_WARPS = 8, 8


def _chunk_grads_body(at, plan: Plan):
    C = plan.chunk
    dtype = at.refs["v"].dtype
    m = masks(plan, at.n, at.load("doc"), at.load("prev")) if plan.has_segments else masks(plan, at.n)
    i, j = iota((C, C), 0), iota((C, C), 1)
    causal, strict = i >= j, i > j
    if m.same is not None:
        causal, strict = causal & m.same, strict & m.same
    # In the order that keeps the fewest tiles live at once (Triton's registers): the [C, C] chain first.
    G = at.load("G")
    beta = at.load("beta").astype(F32)
    S = at.load("S")
    v, v_new, dv_new, do = at.load("v"), at.load("v_new"), at.load("dv_new"), at.load("do")
    # Through W = T beta k_in and U = T beta v, the inverse T = (I + L)^-1, and dW = -dv_new S^T.
    dW = -dot(dv_new, S, contract=(1, 1))
    k_in = masked(m.carry_in, at.load("k").astype(F32) * jnp.exp(G))
    Bk, Bv = beta * k_in, beta * v.astype(F32)
    dT = dot(dW.astype(dtype), Bk.astype(dtype), contract=(1, 1)) + dot(dv_new, Bv.astype(dtype), contract=(1, 1))
    Td = at.load("T").astype(dtype)
    dBk = dot(Td, dW.astype(dtype), contract=(0, 0))
    dBv = dot(Td, dv_new, contract=(0, 0))
    dL = jnp.where(strict, -dot(dot(Td, dT.astype(dtype), contract=(0, 0)).astype(dtype), Td, contract=(1, 1)), 0.0)
    at.store("dv", beta * dBv)
    at.store("dbeta", jnp.sum(dBk * k_in, axis=1, keepdims=True) + jnp.sum(dBv * v.astype(F32), axis=1, keepdims=True)
             + jnp.sum(dL * at.load("akk"), axis=1, keepdims=True))
    dAkk = beta * dL
    at.store("dakk", dAkk)
    at.store("dakkt", dAkk.T)
    dAqk = jnp.where(causal, dot(do, v_new, contract=(1, 1)), 0.0)
    at.store("daqk", dAqk)
    at.store("daqkt", dAqk.T)
    dk_in = beta * dBk
    # Through the output (qg = scale q exp(G)) and the outgoing state (kg = k exp(Gamma - G), d = exp(Gamma)).
    eG = jnp.exp(G)
    dqg = dot(do, S, contract=(1, 1))
    at.store("dq", masked(m.carry_in, dqg * eG))
    Gamma = last_row(G)
    dS = at.load("dS")
    dd = jnp.sum(S.astype(F32) * dS.astype(F32), axis=1, keepdims=True).reshape(1, -1)
    # Every G_i sums the gates up to i; the chunk's total decay sums them all (added at the last row, so the
    # suffix sums hand it to every token); kg_j's exponent sums the gates after j (an exclusive prefix sum).
    dGamma = dd * masked(m.through, jnp.exp(Gamma))
    qg = masked(m.carry_in, (at.load("q").astype(F32) * plan.scale) * eG)
    at.store("dg", dqg * qg + dk_in * k_in + jnp.where(iota((C, 1), 0) == C - 1, dGamma, 0.0))
    e_exit = masked(m.to_exit, jnp.exp(Gamma - G))
    dkg = dot(v_new, dS, contract=(1, 1))
    at.store("dk", masked(m.carry_in, dk_in * eG) + dkg * e_exit)
    at.store("dexit", dkg * (at.load("k").astype(F32) * e_exit))


def chunk_grads(plan: Plan, *, q, k, v, G, beta, T, akk, states, dstates, v_new, dv_new, do, doc, prev):
    """-> (dq~ [B,H,Tp,K] fp32 w.r.t. the scaled q, dk [.., K] fp32, dv [.., V] in v's dtype, dbeta [.., 1] fp32,
    dG [.., K] fp32 (for suffix sums), dG_exit [.., K] fp32 (for exclusive prefix sums), dAqk, dAkk and their
    transposes [.., C] fp32): the parts of the gradients that do not pass through the score matrices, and the
    score matrices' cotangents."""
    B, H, Tp, K = q.shape
    C = plan.chunk
    inputs = [operand(nm, "row", x) for nm, x in (("q", q), ("k", k), ("v", v), ("G", G), ("beta", beta), ("T", T),
                                                 ("akk", akk), ("v_new", v_new), ("dv_new", dv_new), ("do", do))]
    inputs += [operand("S", "states", states), operand("dS", "states", dstates)]
    if plan.has_segments:
        inputs += [operand("doc", "doc", doc), operand("prev", "doc", prev)]
    f32 = lambda nm, width: Operand(nm, "row", (B, H, Tp, width), F32)  # noqa: E731
    outputs = [f32("dq", K), f32("dk", K), Operand("dv", "row", v.shape, v.dtype), f32("dbeta", 1), f32("dg", K),
               f32("dexit", K), f32("daqk", C), f32("dakk", C), f32("daqkt", C), f32("dakkt", C)]
    return tuple(chunk_call(plan, lambda at: _chunk_grads_body(at, plan), inputs=inputs, outputs=outputs,
                            name="kda_chunk_grads", batch_heads=(B, H), V=v.shape[-1], warps=CHUNK_GRADS_WARPS))


def _score_grads_body(at, plan: Plan):
    C, BC = plan.chunk, plan.sub
    dtype = at.refs["q"].dtype
    r = at.i * BC
    qi, ki, Gi = at.load("qi").astype(F32) * plan.scale, at.load("ki").astype(F32), at.load("Gi")
    q, k, G = at.load("q").astype(F32) * plan.scale, at.load("k").astype(F32), at.load("G")
    daqk, dakk = at.load("daqk"), at.load("dakk")
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
    dk_col = jnp.exp(Gl - Gi) * (dot(jnp.where(after, at.load("daqkt"), 0.0).astype(dtype), (el * q).astype(dtype))
                                 + dot(jnp.where(after, at.load("dakkt"), 0.0).astype(dtype), (el * k).astype(dtype)))
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
    at.store("dq", dq)
    at.store("dk", dk)
    at.store("dg", dG)


def score_grads(plan: Plan, *, q, k, G, daqk, dakk, daqkt, dakkt):
    """dAqk, dAkk (and their transposes) [B,H,Tp,C] fp32 -> their parts of (dq~ w.r.t. the scaled q, dk, dG)
    [B,H,Tp,K] fp32."""
    B, H, Tp, K = q.shape
    inputs = [operand("qi", "sub", q), operand("ki", "sub", k), operand("Gi", "sub", G), operand("q", "row", q),
              operand("k", "row", k), operand("G", "row", G), operand("daqk", "sub", daqk),
              operand("dakk", "sub", dakk), operand("daqkt", "sub", daqkt), operand("dakkt", "sub", dakkt)]
    outputs = [Operand(nm, "sub", q.shape, F32) for nm in ("dq", "dk", "dg")]
    return tuple(chunk_call(plan, lambda at: _score_grads_body(at, plan), inputs=inputs, outputs=outputs,
                            name="kda_score_grads", batch_heads=(B, H), subs=True, warps=SCORE_GRADS_WARPS))
