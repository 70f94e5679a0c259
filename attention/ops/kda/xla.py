"""KDA in chunks of 64 tokens (the WY/UT form): intra-chunk work as matmuls with one unit-lower-triangular
inverse per chunk, a `lax.scan` over chunks for the fp32 state. Every decay exponent is a sum of gates over
a causal range, so it is <= 0 and large |g| underflows to zero instead of overflowing."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from attention.ops import dispatch
from attention.ops.recurrent import doc_starts, initial_state_or_zeros, masked_exp, resolve_scale

# fla's chunk; the body is matmul-shaped (C x C scores and inverse, C x (K+V) products) for the
# Pallas port.
CHUNK = 64
# (batch, head, chunk) items whose intra-chunk work is done together, by backend; None = all at
# once. Vectorising over every chunk at once leaves the caches at long T. CPU, op fwd+bwd at B=1,
# H=4, K=V=64 on the 2-core machine (medians of 5, variants interleaved, machine shared):
# all at once / groups of 16 / 64: T=512 41 / 42 / 42 ms, T=2048 252 / 196 / 238 ms,
# T=8192 1751 / 1161 / 1277 ms; grouping also halves the temporary memory at T=8192 (341 -> 171
# MiB). GPU/TPU: not measured; all at once keeps the device busy.
INTRA_GROUP = {"cpu": 16}
_F32 = jnp.float32
# The xla form is checked against the reference at 1e-5; TF32 or one-pass bf16 dots (GPU/TPU
# defaults for fp32) would break that and perturb the triangular inverse.
_einsum = functools.partial(jnp.einsum, precision=lax.Precision.HIGHEST)


def _exclusive_suffix_sum(x, axis):
    """sum of x over the positions strictly after each one along `axis`; summed directly rather
    than as total - prefix, which cancels catastrophically once the prefix is large."""
    incl = lax.cumsum(x, axis=axis % x.ndim, reverse=True)
    tail = lax.slice_in_dim(incl, 1, x.shape[axis], axis=axis)
    return jnp.concatenate([tail, jnp.zeros_like(lax.slice_in_dim(incl, 0, 1, axis=axis))], axis=axis)


def _merge_blocks(diag_XQbb, off_XPbb):
    """Diagonal blocks of size b (Q = 2P of them, on axis -3) and the lower-left block of each
    pair -> P diagonal blocks of size 2b: [[first, 0], [off, second]]."""
    first_XPbb, second_XPbb = diag_XQbb[..., 0::2, :, :], diag_XQbb[..., 1::2, :, :]
    return jnp.concatenate([jnp.concatenate([first_XPbb, jnp.zeros_like(off_XPbb)], axis=-1),
                            jnp.concatenate([off_XPbb, second_XPbb], axis=-1)], axis=-2)


def _halves(x_XCD, b):
    """[..., C, D] -> the first and second halves of each 2b-block, each [..., C/(2b), b, D]."""
    *lead, C, D = x_XCD.shape
    x_XP2bD = x_XCD.reshape(*lead, C // (2 * b), 2, b, D)
    return x_XP2bD[..., 0, :, :], x_XP2bD[..., 1, :, :]


def _scores(q_ZCK, k_ZCK, g_ZCK):
    """Decayed causal scores inside each chunk, before document masking:
    Aqk[i, j] = sum_c q_i[c] k_j[c] exp(sum of g[c] over (j, i]) for j <= i, and Akk the same
    with k_i for j < i.

    Built bottom-up over block sizes b = 1, 2, ..., C/2: the lower-left block of every 2b-block
    factors at the block's midpoint m as exp(sum over (m, i]) * exp(sum over (j, m]). Both
    exponents are sums of gates over a range (<= 0, and computed as local cumsums rather than
    differences of chunk-wide prefixes, so nothing cancels), and every block is one matmul. No
    pair of tokens gets its own exponent, and diagonal entries carry no gate at all.
    """
    Z, C, K = q_ZCK.shape
    # Both score matrices share every decay factor; stacked on a leading axis (query rows, key
    # rows) each level is one matmul and one merge.
    A_2ZQbb = jnp.stack([jnp.sum(q_ZCK * k_ZCK, axis=-1), jnp.zeros((Z, C), q_ZCK.dtype)])[..., None, None]
    qk_2ZCK = jnp.stack([q_ZCK, k_ZCK])
    b = 1
    while b < C:
        g0_ZPbK, g1_ZPbK = _halves(g_ZCK, b)
        kcol_ZPbK = _halves(k_ZCK, b)[0] * jnp.exp(_exclusive_suffix_sum(g0_ZPbK, axis=2))
        row_2ZPbK = _halves(qk_2ZCK, b)[1] * jnp.exp(jnp.cumsum(g1_ZPbK, axis=2))
        A_2ZQbb = _merge_blocks(A_2ZQbb, _einsum("wzpik,zpjk->wzpij", row_2ZPbK, kcol_ZPbK))
        b *= 2
    return A_2ZQbb[0].reshape(Z, C, C), A_2ZQbb[1].reshape(Z, C, C)


def _unit_lower_inverse_impl(L_ZCC):
    # The same bottom-up doubling: [[A, 0], [L21, D]]^-1 = [[A^-1, 0], [-D^-1 L21 A^-1, D^-1]].
    # Exact algebra (no Neumann series) and matmul-shaped. It replaces
    # lax.linalg.triangular_solve, whose CPU (LAPACK) kernel deadlocked in this op's backward on
    # the 2-core machine (jaxlib 0.10.2: two trsm calls each waiting on batch workers).
    Z, C, _ = L_ZCC.shape
    inv_ZQbb = jnp.ones((Z, C, 1, 1), L_ZCC.dtype)
    b = 1
    while b < C:
        P = C // (2 * b)
        p_ = np.arange(P)
        L21_PZbb = L_ZCC.reshape(Z, P, 2 * b, P, 2 * b)[:, p_, b:, p_, :b]
        off_ZPbb = -_einsum("zpij,pzjk,zpkl->zpil", inv_ZQbb[:, 1::2], L21_PZbb, inv_ZQbb[:, 0::2])
        inv_ZQbb = _merge_blocks(inv_ZQbb, off_ZPbb)
        b *= 2
    return inv_ZQbb.reshape(Z, C, C)


@jax.custom_vjp
def _unit_lower_inverse(L_ZCC):
    """(I + L)^-1 for a batch of strictly lower-triangular L (only that triangle is read)."""
    return _unit_lower_inverse_impl(L_ZCC)


def _unit_lower_inverse_fwd(L_ZCC):
    inv_ZCC = checkpoint_name(_unit_lower_inverse_impl(L_ZCC), "kda_inv")
    return inv_ZCC, inv_ZCC


def _unit_lower_inverse_bwd(inv_ZCC, d_inv_ZCC):
    # d(M^-1) = -M^-1 dM M^-1, so dL = -M^-T d(M^-1) M^-T on the strictly lower triangle.
    dL_ZCC = -_einsum("zji,zjk,zlk->zil", inv_ZCC, d_inv_ZCC, inv_ZCC)
    C = inv_ZCC.shape[-1]
    return (jnp.where(np.tri(C, k=-1, dtype=bool), dL_ZCC, 0.0),)


_unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)

# The intra-chunk backward keeps only the inverse; the scores and their decay factors are
# recomputed, so stored activations stay O(T*C + T*(K+V)) per head.
@functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.save_only_these_names("kda_inv"))
def _intra_chunk(q_ZCK, k_ZCK, v_ZCV, g_ZCK, beta_ZC, same_ZCC, carry_in_ZC):
    """Chunk-local part of the WY form; Z runs over every (batch, head, chunk).

    Returns (Aqk [Z,C,C], U [Z,C,V], W [Z,C,K]) such that, with S_in the state entering the
    chunk, the pseudo-values are delta = U - W S_in and o = (q exp G) S_in + Aqk delta.
    Intermediates stay at rank <= 6: XLA:CPU (jaxlib 0.10.2) crashes on some rank-7 reductions
    that have a unit dimension, which B=1 or H=1 would bring if B, H and N were kept apart.
    """
    V = v_ZCV.shape[-1]
    Aqk_ZCC, Akk_ZCC = _scores(q_ZCK, k_ZCK, g_ZCK)
    # Pairs in different documents never interact.
    Aqk_ZCC = jnp.where(same_ZCC, Aqk_ZCC, 0.0)
    # (I + L) delta = beta v - beta (k exp G) S_in, solved for both right-hand sides at once. A
    # token whose document started inside the chunk never sees S_in.
    inv_ZCC = _unit_lower_inverse(jnp.where(same_ZCC, beta_ZC[:, :, None] * Akk_ZCC, 0.0))
    kin_ZCK = jnp.where(carry_in_ZC[:, :, None], k_ZCK * jnp.exp(jnp.cumsum(g_ZCK, axis=1)), 0.0)
    rhs_ZCX = beta_ZC[:, :, None] * jnp.concatenate([v_ZCV, kin_ZCK], axis=-1)
    X_ZCX = _einsum("zij,zjx->zix", inv_ZCC, rhs_ZCX)
    return Aqk_ZCC, X_ZCX[:, :, :V], X_ZCX[:, :, V:]


def _intra_chunk_grouped(*xs_Z):
    """`_intra_chunk` over groups of INTRA_GROUP items in a `lax.map`, so each group's working
    set stays in cache; items added to fill the last group are all-zero chunks (finite, dropped)."""
    Z = xs_Z[0].shape[0]
    G = INTRA_GROUP.get(dispatch.backend())
    if G is None or Z <= G:
        return _intra_chunk(*xs_Z)
    n_groups = -(-Z // G)

    def grouped(x):
        x = jnp.pad(x, ((0, n_groups * G - Z),) + ((0, 0),) * (x.ndim - 1))
        return x.reshape(n_groups, G, *x.shape[1:])

    outs = lax.map(lambda xs: _intra_chunk(*xs), tuple(grouped(x) for x in xs_Z))
    return tuple(o.reshape(n_groups * G, *o.shape[2:])[:Z] for o in outs)


@dispatch.register("kda", "xla")
def kda_xla(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
            segment_ids=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    # A sequence shorter than a chunk (a decode step, T = 1) takes the next power of two instead of
    # padding to a full chunk; the doubling in `_scores` and the inverse need a power of two.
    C = min(CHUNK, 1 << (T - 1).bit_length())
    N = -(-T // C)
    pad = N * C - T
    scale = resolve_scale(scale, K)

    def chunks(x):
        # [B,T,H,D] -> [B*H*N, C, D]. Zero right-padding is exact: a padded token has beta = k = 0
        # (writes nothing) and g = 0 (keeps the state), so neither outputs nor final state change.
        x = jnp.pad(x.astype(_F32), ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape(B, N, C, H, -1).transpose(0, 3, 1, 2, 4).reshape(B * H * N, C, -1)

    q_ZCK = chunks(q) * scale
    k_ZCK, v_ZCV, g_ZCK = chunks(k), chunks(v), chunks(g)
    beta_ZC = chunks(beta[..., None])[..., 0]

    # Document index per token (how many documents started at or before it).
    doc_BT = jnp.cumsum(doc_starts(segment_ids, B, T), axis=1, dtype=jnp.int32)
    doc_BNC = jnp.pad(doc_BT, ((0, 0), (0, pad)), mode="edge").reshape(B, N, C)
    # Document of the token just before each chunk (chunk 0: the initial state's, i.e. 0).
    doc_before_BN = jnp.pad(doc_BNC[:, :-1, -1], ((0, 0), (1, 0)))

    def per_head(x_BN_):  # [B, N, ...] -> [B*H*N, ...], the layout of the chunked tensors
        return jnp.broadcast_to(x_BN_[:, None], (B, H) + x_BN_.shape[1:]).reshape(B * H * N, *x_BN_.shape[2:])

    same_ZCC = per_head(doc_BNC[:, :, :, None] == doc_BNC[:, :, None, :])
    carry_in_ZC = per_head(doc_BNC == doc_before_BN[:, :, None])
    # Only the document still open at the chunk's end reaches the state leaving it.
    to_exit_ZC = per_head(doc_BNC == doc_BNC[:, :, -1:])

    Aqk_ZCC, U_ZCV, W_ZCK = _intra_chunk_grouped(q_ZCK, k_ZCK, v_ZCV, g_ZCK, beta_ZC, same_ZCC, carry_in_ZC)

    kexit_ZCK = k_ZCK * masked_exp(_exclusive_suffix_sum(g_ZCK, axis=1), to_exit_ZC[:, :, None])
    decay_exit_ZK = jnp.where(carry_in_ZC[:, -1:], jnp.exp(jnp.sum(g_ZCK, axis=1)), 0.0)

    def scan_major(x):  # [B*H*N, ...] -> [N, B, H, ...]
        return jnp.moveaxis(x.reshape(B, H, N, *x.shape[1:]), 2, 0)

    def step(S_BHKV, xs):
        U_BHCV, W_BHCK, kexit_BHCK, decay_BHK = xs
        delta_BHCV = U_BHCV - _einsum("bhck,bhkv->bhcv", W_BHCK, S_BHKV)
        S_next = decay_BHK[..., None] * S_BHKV + _einsum("bhck,bhcv->bhkv", kexit_BHCK, delta_BHCV)
        return S_next, (S_BHKV, delta_BHCV)

    xs = tuple(scan_major(x) for x in (U_ZCV, W_ZCK, kexit_ZCK, decay_exit_ZK))
    S_BHKV, (S_in_NBHKV, delta_NBHCV) = lax.scan(step, initial_state_or_zeros(initial_state, B, H, K, V), xs)

    qin_ZCK = jnp.where(carry_in_ZC[:, :, None], q_ZCK * jnp.exp(jnp.cumsum(g_ZCK, axis=1)), 0.0)
    S_in_ZKV = jnp.moveaxis(S_in_NBHKV, 0, 2).reshape(B * H * N, K, V)
    delta_ZCV = jnp.moveaxis(delta_NBHCV, 0, 2).reshape(B * H * N, C, V)
    o_ZCV = _einsum("zck,zkv->zcv", qin_ZCK, S_in_ZKV) + _einsum("zij,zjv->ziv", Aqk_ZCC, delta_ZCV)
    o_BTHV = o_ZCV.reshape(B, H, N * C, V).transpose(0, 2, 1, 3)[:, :T]
    return o_BTHV.astype(v.dtype), (S_BHKV if output_final_state else None)
