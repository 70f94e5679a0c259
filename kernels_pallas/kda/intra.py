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

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.chunked import Plan, compiler_params, dot, first_row, iota, masked, masks

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


def _scores_kernel(*refs, plan: Plan):
    qi_ref, ki_ref, gi_ref, k_ref, g_ref = refs[:5]
    doc_ref, prev_ref, doci_ref = refs[5:8] if plan.has_segments else (None, None, None)
    aqk_ref, akk_ref = refs[-2:]
    C, BC = plan.chunk, plan.sub
    n, I = pl.program_id(2), pl.program_id(3)
    dtype = aqk_ref.dtype
    r = I * BC
    qi = qi_ref[...].astype(F32) * plan.scale
    ki = ki_ref[...].astype(F32)
    Gi, G = gi_ref[...], g_ref[...]
    Gr = first_row(Gi)
    # Earlier sub-blocks: two matmuls with every exponent relative to row r.
    earlier = iota((C, 1), 0) < r
    ks = masked_exp(earlier, Gr - G) * k_ref[...].astype(F32)
    ei = jnp.exp(Gi - Gr)
    aqk = dot((qi * ei).astype(dtype), ks.astype(dtype), contract=(1, 1))
    akk = dot((ki * ei).astype(dtype), ks.astype(dtype), contract=(1, 1))
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
        m = masks(plan, n, doc_ref[...], prev_ref[...], rows=doci_ref[...])
        aqk, akk = masked(m.same, aqk), masked(m.same, akk)
    aqk_ref[...] = aqk.astype(dtype)
    akk_ref[...] = akk


def scores(plan: Plan, *, q, k, G, doc, prev):
    """q, k [B,H,Tp,K]; G [B,H,Tp,K] fp32 -> (Aqk [B,H,Tp,C] in q's dtype with the scale, Akk [B,H,Tp,C] fp32):
    row t holds token t's scores against its chunk's C tokens."""
    B, H, Tp, K = q.shape
    C, BC, S = plan.chunk, plan.sub, plan.subs
    sub = lambda width: pl.BlockSpec((None, None, BC, width), lambda b, h, n, i: (b, h, n * S + i, 0))  # noqa
    whole = pl.BlockSpec((None, None, C, K), lambda b, h, n, i: (b, h, n, 0))
    in_specs = [sub(K), sub(K), sub(K), whole, whole]
    args = [q, k, G, k, G]
    if plan.has_segments:
        in_specs += [pl.BlockSpec((None, C, 1), lambda b, h, n, i: (b, n, 0))] * 2
        in_specs.append(pl.BlockSpec((None, BC, 1), lambda b, h, n, i: (b, n * S + i, 0)))
        args += [doc, prev, doc]
    return pl.pallas_call(
        lambda *refs: _scores_kernel(*refs, plan=plan), grid=(B, H, plan.num_chunks, S), in_specs=in_specs,
        out_specs=(sub(C), sub(C)),
        out_shape=(jax.ShapeDtypeStruct((B, H, Tp, C), q.dtype), jax.ShapeDtypeStruct((B, H, Tp, C), F32)),
        interpret=plan.interpret, name="kda_scores",
        compiler_params=compiler_params(plan, 4, warps=SCORES_WARPS),
    )(*args)


def unit_lower_inverse(L):
    """(I + L)^-1 for strictly lower-triangular L [C, C] fp32, by block doubling (matmuls only)."""
    C = L.shape[0]
    i, j = iota((C, C), 0), iota((C, C), 1)
    X = (i == j).astype(F32)

    def double(level, X):
        lower_left = ((i >> (level + 1)) == (j >> (level + 1))) & (((i >> level) & 1) == 1) & (((j >> level) & 1) == 0)
        return X - dot(dot(X, jnp.where(lower_left, L, 0.0)), X)

    return lax.fori_loop(0, max(1, (C - 1).bit_length()), double, X)


def _solve_kernel(*refs, plan: Plan, with_inverse: bool):
    akk_ref, beta_ref, k_ref, v_ref, g_ref = refs[:5]
    doc_ref, prev_ref = refs[5:7] if plan.has_segments else (None, None)
    w_ref, u_ref = refs[-3:-1] if with_inverse else refs[-2:]
    dtype = w_ref.dtype
    beta = beta_ref[...].astype(F32)
    T = unit_lower_inverse(beta * akk_ref[...])
    m = masks(plan, pl.program_id(2), doc_ref[...], prev_ref[...]) if plan.has_segments else masks(plan, 0)
    k_in = masked(m.carry_in, k_ref[...].astype(F32) * jnp.exp(g_ref[...]))
    Td = T.astype(dtype)
    w_ref[...] = dot(Td, (beta * k_in).astype(dtype)).astype(dtype)
    u_ref[...] = dot(Td, (beta * v_ref[...].astype(F32)).astype(dtype)).astype(dtype)
    if with_inverse:
        refs[-1][...] = T


def solve(plan: Plan, *, akk, beta, k, v, G, doc, prev, with_inverse=False):
    """akk [B,H,Tp,C] fp32; beta [B,H,Tp,1]; k, G [B,H,Tp,K]; v [B,H,Tp,V] -> (W [B,H,Tp,K], U [B,H,Tp,V] in
    v's dtype[, T = (I + beta Akk)^-1 [B,H,Tp,C] fp32 when with_inverse])."""
    B, H, Tp, K = k.shape
    V = v.shape[-1]
    C = plan.chunk
    row_ = lambda width: pl.BlockSpec((None, None, C, width), lambda b, h, n: (b, h, n, 0))  # noqa: E731
    in_specs = [row_(C), row_(1), row_(K), row_(V), row_(K)]
    args = [akk, beta, k, v, G]
    if plan.has_segments:
        in_specs += [pl.BlockSpec((None, C, 1), lambda b, h, n: (b, n, 0))] * 2
        args += [doc, prev]
    out_specs = [row_(K), row_(V)] + ([row_(C)] if with_inverse else [])
    out_shape = [jax.ShapeDtypeStruct(k.shape, v.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    out_shape += [jax.ShapeDtypeStruct(akk.shape, F32)] if with_inverse else []
    return pl.pallas_call(
        lambda *refs: _solve_kernel(*refs, plan=plan, with_inverse=with_inverse), grid=(B, H, plan.num_chunks),
        in_specs=in_specs, out_specs=tuple(out_specs), out_shape=tuple(out_shape),
        interpret=plan.interpret, name="kda_solve",
        compiler_params=compiler_params(plan, 3, warps=SOLVE_WARPS),
    )(*args)
