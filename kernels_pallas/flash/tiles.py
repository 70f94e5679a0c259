"""The pieces every flash kernel shares: the static plan of one call, loop bounds that skip fully masked tiles,
the masked logits of one (query block, key block) tile, and fp32-accumulating dots.

Positions are bottom-right aligned as in `softmax_attention`: query row r sits at position S - T + r, key column
c at position c. The plan is static (hashable), so it is a `custom_vjp` non-differentiable argument and a jit key.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one call: true and padded lengths, tiles, which masks and inputs exist."""

    t: int                      # query length before padding
    s: int                      # key length before padding
    t_pad: int                  # padded to a multiple of block_q
    s_pad: int                  # padded to a multiple of block_k
    block_q: int
    block_k: int
    group: int                  # query heads per kv head
    scale: float
    causal: bool
    sliding_window: int | None
    local_window: int | None    # with a gate: keys with t - s < local_window are spared (None: gate every key)
    has_gate: bool
    has_segments: bool
    kv_shared: bool             # one array is both key and value
    interpret: Any              # False, True (generic interpret) or pltpu.InterpretParams (the TPU interpreter)
    num_warps: int
    num_stages: int
    pipeline: bool              # the TPU key-block pipeline (pipeline.py) instead of the row driver
    compact: bool = False       # SP-KV's compact keys (compact.py): positions carried, visible at t - s >= local_window

    @property
    def offset(self) -> int:
        return self.s - self.t

    @property
    def num_q_blocks(self) -> int:
        return self.t_pad // self.block_q

    @property
    def num_k_blocks(self) -> int:
        return self.s_pad // self.block_k

    def kv_range(self, i):
        """[lo, hi) of the key blocks that causal and window masks leave visible to query block i."""
        first = self.offset + i * self.block_q
        last = self.offset + jnp.minimum((i + 1) * self.block_q, self.t) - 1
        key_hi = jnp.minimum(self.s, last + 1) if self.causal else jnp.int32(self.s)
        key_lo = jnp.maximum(0, first - self.sliding_window + 1) if self.sliding_window else jnp.int32(0)
        lo = lax.div(key_lo, self.block_k)
        hi = lax.div(key_hi + self.block_k - 1, self.block_k)
        return lo, jnp.where(key_hi > key_lo, hi, lo)

    def q_range(self, j):
        """[lo, hi) of the query blocks that causal and window masks let see some key of key block j."""
        first = j * self.block_k
        last = jnp.minimum((j + 1) * self.block_k, self.s) - 1
        q_lo = jnp.maximum(0, first - self.offset) if self.causal else jnp.int32(0)
        q_hi = (jnp.minimum(self.t, last + self.sliding_window - self.offset) if self.sliding_window
                else jnp.int32(self.t))
        lo = lax.div(q_lo, self.block_q)
        hi = lax.div(q_hi + self.block_q - 1, self.block_q)
        return lo, jnp.where(q_hi > q_lo, hi, lo)


def online_softmax_step(m, l, acc, s, v):
    """One key tile of the online softmax: running row max m [R,1], row sum l [R,1] and output acc [R,Dv] (fp32)
    updated with logits s [R,bk] (-inf where masked) and values v [bk,Dv]. A row that has seen no visible key
    keeps max -inf; it is shifted by 0 so exp stays exp(-inf) = 0."""
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe)
    alpha = jnp.exp(m - m_safe)
    return m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True), alpha * acc + dot(p.astype(v.dtype), v)


def when_documents_meet(q_doc, k_doc, work, carry):
    """work(carry) if some query of the tile shares a document with some key, else carry unchanged: tiles
    between different documents are skipped, not masked. q_doc [bq, 1], k_doc [1, bk] are sorted document
    indices (None: no documents, always work)."""
    if q_doc is None:
        return work(carry)
    meet = (jnp.min(q_doc) <= jnp.max(k_doc)) & (jnp.min(k_doc) <= jnp.max(q_doc))
    return lax.cond(meet, work, lambda c: c, carry)


def dot(a, b, *, contract=(1, 0)):
    """a @ b contracting a's axis contract[0] with b's axis contract[1], fp32 accumulation; fp32 operands get
    full-precision products (no TF32 or bf16 passes)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           preferred_element_type=jnp.float32, precision=precision)


def pick(ref, row: int, i):
    """Entry [row, i] of a small int table block (the compact ranges) as a scalar: a masked sum, since Triton
    cannot index a loaded value."""
    values = ref[row:row + 1, :]
    return jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, values.shape, 1) == i, values, 0))


def logits(plan: Plan, q, k, i, j, gate=None, q_doc=None, k_doc=None, *, masked=True, keys_major=False,
           k_pos=None):
    """Masked fp32 logits [bq, bk] of tile (i, j) and the gated-key mask (None when the gate covers every key).

    q [bq, D], k [bk, D]; gate [1, bk] fp32; q_doc [bq, 1] and k_doc [1, bk] document indices. Masked entries are
    -inf, so exp gives an exact 0 with a zero derivative. Compact keys (plan.compact) bring their positions k_pos
    [1, bk]: a query sees one at t - k_pos >= local_window (empty slots sit at compact.FAR), gate added.

    keys_major: the tile is [bk, bq] (keys on rows; gate and k_doc [bk, 1], q_doc [1, bq]), so per-query rows
    (lse, delta) broadcast lane-dense in the TPU dk/dv kernel. masked=False is for a tile that `blocks` calls
    FULL (every pair visible, the gate on every pair): the scaled dot plus the gate, with no compare at all.
    """
    s = (dot(k, q, contract=(1, 1)) if keys_major else dot(q, k, contract=(1, 1))) * plan.scale
    if not masked:
        return (s if gate is None else s + gate), None
    q_axis = 1 if keys_major else 0
    q_pos = plan.offset + i * plan.block_q + lax.broadcasted_iota(jnp.int32, s.shape, q_axis)
    if k_pos is None:
        k_pos = j * plan.block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1 - q_axis)
    rel = q_pos - k_pos
    gated = None
    if gate is not None:
        if plan.local_window is None or plan.compact:
            s = s + gate
        else:
            gated = rel >= plan.local_window
            s = s + jnp.where(gated, gate, 0.0)
    if plan.compact:
        visible = rel >= plan.local_window
    else:
        visible = k_pos < plan.s
    if plan.causal and not plan.compact:
        visible &= rel >= 0
    if plan.sliding_window is not None:
        visible &= rel < plan.sliding_window
    if q_doc is not None:
        visible &= q_doc == k_doc
    return jnp.where(visible, s, -jnp.inf), gated
