"""The intra-chunk algebra of the KDA kernel on whole [C, *] tiles: masks, reductions and dots only (no value
slicing, no scratch), so one body runs interpreted, on Triton and on Mosaic.

Per chunk of C tokens, with G the within-chunk inclusive cumulative sum of the gates (per key channel):

    Aqk[i, j] = sum_c q_i[c] k_j[c] exp(G_i[c] - G_j[c])      j <= i, same document
    L[i, j]   = beta_i sum_c k_i[c] k_j[c] exp(G_i[c] - G_j[c])  j < i, same document
    [U | W]   = (I + L)^-1 beta [v | k exp(G)]                  (k exp(G) only for tokens the incoming state reaches)

so that, with S the state entering the chunk, delta = U - W S, o = scale q exp(G) S + scale Aqk delta and the state
leaving is exp(G_last) S + (k exp(G_last - G))^T delta. Every exponent is a gate sum over a causal range (<= 0).
The score columns are built one key at a time and (I + L) is solved by forward substitution one row at a time,
each step a masked whole-tile update.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from kernels_pallas.chunked import Plan, dot


def _iota(shape, axis):
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def row_of(x, j):
    """Row j of x [C, D] as [1, D] (a masked sum: no dynamic slicing of a value)."""
    return jnp.sum(jnp.where(_iota(x.shape, 0) == j, x, 0.0), axis=0, keepdims=True)


def cumulative(g, *, inclusive=True, reverse=False):
    """Within-chunk cumulative sums of g [C, K] as a triangular dot: prefix (inclusive) or suffix sums over the
    tokens strictly after each one (reverse, exclusive)."""
    C = g.shape[0]
    i, j = _iota((C, C), 0), _iota((C, C), 1)
    tri = (j > i) if reverse else ((j <= i) if inclusive else (j < i))
    return dot(tri.astype(jnp.float32), g)


def scores(q, k, G, same):
    """(Aqk, Akk) [C, C]: decayed q.k and k.k products over j <= i (Akk: j < i), zero elsewhere and between
    documents (same [C, C] bool or None). One key column per step."""
    C = q.shape[0]
    i = _iota((C, 1), 0)
    col = _iota((C, C), 1)

    def column(j, acc):
        aqk, akk = acc
        kj, Gj = row_of(k, j), row_of(G, j)
        w = jnp.exp(jnp.where(i >= j, G - Gj, -jnp.inf)) * kj        # [C, K]; rows before j are 0
        put = col == j
        aqk = jnp.where(put, jnp.sum(q * w, axis=1, keepdims=True), aqk)
        akk = jnp.where(put & (i > j), jnp.sum(k * w, axis=1, keepdims=True), akk)
        return aqk, akk

    zero = jnp.zeros((C, C), jnp.float32)
    aqk, akk = lax.fori_loop(0, C, column, (zero, zero))
    if same is not None:
        aqk, akk = jnp.where(same, aqk, 0.0), jnp.where(same, akk, 0.0)
    return aqk, akk


def solve_unit_lower(L, rhs):
    """(I + L)^-1 rhs for strictly lower-triangular L [C, C], by forward substitution: row i takes rhs_i minus
    sum_{j<i} L[i, j] x_j once rows j < i are final."""
    C = L.shape[0]
    Lt = L.T  # column i of Lt is row i of L, laid out along the rows j it multiplies
    rows = _iota((C, 1), 0)
    cols = _iota((C, C), 1)

    def step(i, x):
        l_i = jnp.sum(jnp.where(cols == i, Lt, 0.0), axis=1, keepdims=True)     # [C, 1]: L[i, j] at row j
        update = jnp.sum(l_i * x, axis=0, keepdims=True)                          # [1, W]
        return jnp.where(rows == i, x - update, x)

    return lax.fori_loop(1, C, step, rhs)


def solve_unit_lower_transposed(L, rhs):
    """(I + L)^-T rhs for strictly lower-triangular L [C, C], by back substitution: row i takes rhs_i minus
    sum_{j>i} L[j, i] z_j once rows j > i are final."""
    C = L.shape[0]
    rows = _iota((C, 1), 0)
    cols = _iota((C, C), 1)

    def step(r, z):
        i = C - 1 - r
        l_i = jnp.sum(jnp.where(cols == i, L, 0.0), axis=1, keepdims=True)      # [C, 1]: L[j, i] at row j
        update = jnp.sum(l_i * z, axis=0, keepdims=True)
        return jnp.where(rows == i, z - update, z)

    return lax.fori_loop(1, C, step, rhs)


def score_grads(q, k, G, d_aqk, d_akk):
    """Gradients through the decayed score matrices of `scores`, given their cotangents (already masked to the
    pairs that exist): (dq from Aqk, dk in the row role of Akk, dk in the column role of Aqk and Akk, dG), each
    [C, K]. A pair (i, j) with j < i adds its term to dG_i and takes it from dG_j; diagonal pairs carry no gate,
    and summing them into both and cancelling would cost the small terms of strong gates their precision, so dG
    is accumulated from the off-diagonal terms directly."""
    C = q.shape[0]
    i = _iota((C, 1), 0)
    col = _iota((C, C), 1)
    row_k = _iota(k.shape, 0)

    def column(j, acc):
        dq, dk_row, dk_col, dG = acc
        kj, Gj = row_of(k, j), row_of(G, j)
        e = jnp.exp(jnp.where(i >= j, G - Gj, -jnp.inf))                           # [C, K]
        a = jnp.sum(jnp.where(col == j, d_aqk, 0.0), axis=1, keepdims=True)     # [C, 1]
        b = jnp.sum(jnp.where(col == j, d_akk, 0.0), axis=1, keepdims=True)
        dq = dq + a * kj * e
        dk_row = dk_row + b * kj * e
        dk_j = jnp.sum((a * q + b * k) * e, axis=0, keepdims=True)              # [1, K]
        term = jnp.where(i > j, a * q + b * k, 0.0) * kj * e                      # off-diagonal pair terms
        dG = dG + term - jnp.where(row_k == j, jnp.sum(term, axis=0, keepdims=True), 0.0)
        return dq, dk_row, dk_col + jnp.where(row_k == j, dk_j, 0.0), dG

    zero = jnp.zeros(k.shape, jnp.float32)
    return lax.fori_loop(0, C, column, (zero, zero, zero, zero))


@dataclasses.dataclass
class Chunk:
    """One chunk's forward quantities (all fp32), from its inputs alone: everything but the state."""

    q: jnp.ndarray          # scale * q [C, K]
    k: jnp.ndarray
    v: jnp.ndarray
    g: jnp.ndarray
    beta: jnp.ndarray       # [C, 1]
    G: jnp.ndarray          # within-chunk inclusive gate sums [C, K]
    same: jnp.ndarray | None        # [C, C] same document (None: one document)
    carry_in: jnp.ndarray | None    # [C, 1] tokens the incoming state reaches
    to_exit: jnp.ndarray | None     # [C, 1] tokens whose writes reach the outgoing state
    through: jnp.ndarray            # [1, 1] the incoming state reaches the chunk's end
    aqk: jnp.ndarray
    akk: jnp.ndarray
    U: jnp.ndarray          # (I + L)^-1 beta v
    W: jnp.ndarray          # (I + L)^-1 beta k_in
    q_in: jnp.ndarray       # q exp(G), where the incoming state reaches
    k_in: jnp.ndarray
    k_exit: jnp.ndarray     # k exp(gates after it in the chunk), where its write reaches the outgoing state
    decay: jnp.ndarray      # [1, K] exp(all gates of the chunk), where the incoming state reaches its end


def masked(mask, x):
    return x if mask is None else jnp.where(mask, x, 0.0)


def chunk_quantities(plan: Plan, n, q, k, v, g, beta, doc=None, prev=None) -> Chunk:
    """Chunk n's quantities from its input tiles (any dtype; computed in fp32). doc, prev [C, 1] int32: the
    document of each token and of the token before it (None without documents)."""
    C = plan.chunk
    f32 = jnp.float32
    q, k, v = q.astype(f32) * plan.scale, k.astype(f32), v.astype(f32)
    g, beta = g.astype(f32), beta.astype(f32)
    i = _iota((C, 1), 0)
    real = i < jnp.minimum(C, plan.t - n * C)
    same = carry_in = to_exit = None
    through = jnp.ones((1, 1), bool)
    if doc is not None:
        same = doc == doc.reshape(1, C)
        before = jnp.max(jnp.where(i == 0, prev, -1), axis=0, keepdims=True)
        last = jnp.max(jnp.where(real, doc, -1), axis=0, keepdims=True)
        carry_in, to_exit, through = doc == before, doc == last, last == before
    G = cumulative(g)
    aqk, akk = scores(q, k, G, same)
    L = beta * akk
    k_in = masked(carry_in, k * jnp.exp(G))
    U = solve_unit_lower(L, beta * v)
    W = solve_unit_lower(L, beta * k_in)
    return Chunk(q=q, k=k, v=v, g=g, beta=beta, G=G, same=same, carry_in=carry_in, to_exit=to_exit,
                 through=through, aqk=aqk, akk=akk, U=U, W=W, q_in=masked(carry_in, q * jnp.exp(G)), k_in=k_in,
                 k_exit=masked(to_exit, k * jnp.exp(cumulative(g, reverse=True))),
                 decay=jnp.where(through, jnp.exp(row_of(G, C - 1)), 0.0))     # padded gates are 0
