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


@dataclasses.dataclass(frozen=True)
class Plan:
    t: int              # tokens before padding
    t_pad: int
    chunk: int
    scale: float
    has_segments: bool
    interpret: bool
    num_warps: int

    @property
    def num_chunks(self) -> int:
        return self.t_pad // self.chunk


def dot(a, b, *, contract=(1, 0)):
    """fp32-accumulating a @ b over a's axis contract[0] and b's axis contract[1], full-precision products."""
    return lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32),
                           (((contract[0],), (contract[1],)), ((), ())),
                           preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)


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
