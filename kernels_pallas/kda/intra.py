"""KDA's intra-chunk kernels: the decayed score matrices, then the WY form of the delta rule.

Per chunk of C tokens, with G the within-chunk cumulative gate sums (per key channel) and q scaled:

    Aqk[i, j] = sum_c q_i[c] k_j[c] exp(G_i[c] - G_j[c])      j <= i, same document
    Akk[i, j] = sum_c k_i[c] k_j[c] exp(G_i[c] - G_j[c])      j < i, same document
    T = (I + diag(beta) Akk)^-1,  W = T beta k exp(G),  U = T beta v   (k exp(G) where the incoming state reaches)

`scores`: one program per (batch, head, chunk, 16-row sub-block I) computes rows I of Aqk and Akk. Columns in
earlier sub-blocks come from two matmuls whose operands are scaled relative to the sub-block's first row r:
exp(G_i - G_j) = exp(G_i - G_r) exp(G_r - G_j), both exponents <= 0 for j < r <= i, so nothing overflows however
strong the gates. The 16 columns of the diagonal sub-block need exp(G_i - G_j) per channel and are built a column at
a time (the only loop over rows: inside the 16x16 diagonal block).

`solve`: one program per chunk inverts (I + L) by block doubling, matmuls only: with X_s the inverse of the
diagonal s-blocks, X_2s = X_s - X_s N_s X_s where N_s holds L's lower-left s-block of each 2s-block (fp32, exact
algebra, log2(C) steps); then W and U are two matmuls on the inputs' dtype.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from kernels_pallas.chunk_call import Operand, chunk_call, operand
from kernels_pallas.chunked import Plan, dot, first_row, iota, masked, masks

F32 = jnp.float32
# Triton warps per kernel where the plan's 4 spill (sm_90a, ptxas; `kernels lower --report --ptxas`): the solve's
# [C, C] fp32 products spill 924 B at 4 warps and 384 B at 8; the scores' diagonal loop 8 B at 4.
SOLVE_WARPS, SCORES_WARPS = 16, 8


def masked_exp(mask, x):
    """exp(x) where mask, else 0, never evaluating exp of a masked (possibly positive) exponent."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def row(x, j):
    """Row j (traced) of x [R, X] as [1, X]: a masked reduction (no dynamic slicing of a value)."""
    return jnp.sum(jnp.where(iota(x.shape, 0) == j, x, 0.0), axis=0, keepdims=True)


def column(x, c):
    """Column c (traced) of x [R, C] as [R, 1]."""
    return jnp.sum(jnp.where(iota(x.shape, 1) == c, x, 0.0), axis=1, keepdims=True)


def scores(plan: Plan, *, q, k, G, doc, prev):
    """q, k [B,H,Tp,K]; G [B,H,Tp,K] fp32 -> (Aqk [B,H,Tp,C] in q's dtype with the scale, Akk [B,H,Tp,C] fp32):
    row t holds token t's scores against its chunk's C tokens."""
    B, H, Tp, K = q.shape
    C, BC = plan.chunk, plan.sub
    dtype = q.dtype
    inputs = [operand("qi", "sub", q), operand("ki", "sub", k), operand("Gi", "sub", G), operand("k", "row", k),
              operand("G", "row", G)]
    if plan.has_segments:
        inputs += [operand("doc", "doc", doc), operand("prev", "doc", prev), operand("doci", "doc_sub", doc)]

    def body(at):
        r = at.i * BC
        qi = at.load("qi").astype(F32) * plan.scale
        ki = at.load("ki").astype(F32)
        Gi, G_ = at.load("Gi"), at.load("G")
        Gr = first_row(Gi)
        # Earlier sub-blocks: two matmuls with every exponent relative to row r.
        ks = (masked_exp(iota((C, 1), 0) < r, Gr - G_) * at.load("k").astype(F32)).astype(dtype)
        ei = jnp.exp(Gi - Gr)
        aqk = dot((qi * ei).astype(dtype), ks, contract=(1, 1))
        akk = dot((ki * ei).astype(dtype), ks, contract=(1, 1))
        # The diagonal sub-block, a column at a time.
        i = iota((BC, 1), 0)
        cols = iota((BC, C), 1)

        def diagonal(j, acc):
            aqk, akk = acc
            kj, Gj = row(ki, j), row(Gi, j)
            w = masked_exp(i >= j, Gi - Gj) * kj
            put = cols == r + j
            aqk = jnp.where(put, jnp.sum(qi * w, axis=1, keepdims=True), aqk)
            akk = jnp.where(put & (i > j), jnp.sum(ki * w, axis=1, keepdims=True), akk)
            return aqk, akk

        aqk, akk = lax.fori_loop(0, BC, diagonal, (aqk, akk))
        if plan.has_segments:
            m = masks(plan, at.n, at.load("doc"), at.load("prev"), rows=at.load("doci"))
            aqk, akk = masked(m.same, aqk), masked(m.same, akk)
        at.store("aqk", aqk)
        at.store("akk", akk)

    outputs = [Operand("aqk", "sub", (B, H, Tp, C), dtype), Operand("akk", "sub", (B, H, Tp, C), F32)]
    return tuple(chunk_call(plan, body, inputs=inputs, outputs=outputs, name="kda_scores", batch_heads=(B, H),
                            subs=True, warps=SCORES_WARPS))


def unit_lower_inverse(L):
    """(I + L)^-1 for strictly lower-triangular L [C, C] fp32, by block doubling (matmuls only)."""
    C = L.shape[0]
    i, j = iota((C, C), 0), iota((C, C), 1)
    X = (i == j).astype(F32)

    def double(level, X):
        lower_left = ((i >> (level + 1)) == (j >> (level + 1))) & (((i >> level) & 1) == 1) & (((j >> level) & 1) == 0)
        return X - dot(dot(X, jnp.where(lower_left, L, 0.0)), X)

    return lax.fori_loop(0, max(1, (C - 1).bit_length()), double, X)


def solve(plan: Plan, *, akk, beta, k, v, G, doc, prev, with_inverse=False):
    """akk [B,H,Tp,C] fp32; beta [B,H,Tp,1]; k, G [B,H,Tp,K]; v [B,H,Tp,V] -> (W [B,H,Tp,K], U [B,H,Tp,V] in
    v's dtype[, T = (I + beta Akk)^-1 [B,H,Tp,C] fp32 when with_inverse])."""
    B, H, Tp, K = k.shape
    dtype = v.dtype
    inputs = [operand("akk", "row", akk), operand("beta", "row", beta), operand("k", "row", k),
              operand("v", "row", v), operand("G", "row", G)]
    if plan.has_segments:
        inputs += [operand("doc", "doc", doc), operand("prev", "doc", prev)]

    def body(at):
        b = at.load("beta").astype(F32)
        T = unit_lower_inverse(b * at.load("akk"))
        m = masks(plan, at.n, at.load("doc"), at.load("prev")) if plan.has_segments else masks(plan, at.n)
        k_in = masked(m.carry_in, at.load("k").astype(F32) * jnp.exp(at.load("G")))
        Td = T.astype(dtype)
        at.store("W", dot(Td, (b * k_in).astype(dtype)))
        at.store("U", dot(Td, (b * at.load("v").astype(F32)).astype(dtype)))
        if with_inverse:
            at.store("T", T)

    outputs = [Operand("W", "row", k.shape, dtype), Operand("U", "row", v.shape, dtype)]
    outputs += [Operand("T", "row", akk.shape, F32)] if with_inverse else []
    return tuple(chunk_call(plan, body, inputs=inputs, outputs=outputs, name="kda_solve", batch_heads=(B, H),
                            warps=SOLVE_WARPS))
