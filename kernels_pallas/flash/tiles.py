"""The pieces every flash kernel shares: the static plan of one call, loop bounds that skip fully masked tiles,
the masked logits of one (query block, key block) tile, and fp32-accumulating dots.

Positions are bottom-right aligned as in `softmax_attention`: query row r sits at position S - T + r, key column
c at position c. The plan is static (hashable), so it is a `custom_vjp` non-differentiable argument and a jit key.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as pltriton


def device_kind() -> str:
    """The chip kernels are built for: the lowering's abstract device (`platform.lower`), else the default
    device."""
    abstract = jax.sharding.get_abstract_mesh().abstract_device
    return abstract.device_kind if abstract is not None else jax.devices()[0].device_kind


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
    launch: tuple               # Triton's (num_warps, num_stages) of the forward, dq and dk/dv kernels
    pipeline: bool              # the TPU key-block pipeline (pipeline.py) instead of the row driver
    compact: bool = False       # SP-KV's compact keys (compact.py): positions carried, visible at t - s >= local_window
    exp2: bool = False          # logits in base 2 (log2(e) folded into the scale), exp2; lse stays natural
    head_dims: tuple = (0, 0)   # (D, Dv) of q/k and v
    tile_dims: tuple = (0, 0)   # the tiles' widths: the head dims, or (Triton) the next powers of two

    @property
    def offset(self) -> int:
        return self.s - self.t

    @property
    def num_q_blocks(self) -> int:
        return self.t_pad // self.block_q

    @property
    def num_k_blocks(self) -> int:
        return self.s_pad // self.block_k

    def cols(self, which: int) -> int | None:
        """The head dim (0: q/k, 1: v) where the tiles are wider and their extra columns must be masked."""
        return self.head_dims[which] if self.tile_dims[which] > self.head_dims[which] else None

    def query_rows(self, i, masked: bool = True):
        """The real rows of query block i (a traced count, past block_q in every block but the last), or None
        when no row needs a bound: T is a whole number of blocks, or the tile is an inner (unmasked) one, which
        the loops never take from a ragged end. (When T is under one block the inner loop is empty but its body
        is still traced, and interpret mode cannot trace a whole block's read from a shorter array: bounded.)"""
        inner = not masked and self.t >= self.block_q
        return None if self.t % self.block_q == 0 or inner else self.t - i * self.block_q

    def key_rows(self, j, masked: bool = True):
        """As query_rows, for key block j of the S keys."""
        inner = not masked and self.s >= self.block_k
        return None if self.s % self.block_k == 0 or inner else self.s - j * self.block_k

    def q_order(self, i):
        """The query block that row-driver program i handles: causal rows in reverse, so the blocks that see the
        most keys start first and the short ones fill in at the end."""
        return self.num_q_blocks - 1 - i if self.causal else i

    def kv_range(self, i):
        """[lo, hi) of the key blocks that causal and window masks leave visible to query block i."""
        first = self.offset + i * self.block_q
        last = self.offset + jnp.minimum((i + 1) * self.block_q, self.t) - 1
        key_hi = jnp.minimum(self.s, last + 1) if self.causal else jnp.int32(self.s)
        key_lo = jnp.maximum(0, first - self.sliding_window + 1) if self.sliding_window else jnp.int32(0)
        lo = lax.div(key_lo, self.block_k)
        hi = lax.div(key_hi + self.block_k - 1, self.block_k)
        return lo, jnp.where(key_hi > key_lo, hi, lo)

    def full_kv_range(self, i):
        """[a, b) within kv_range(i): the key blocks whose every pair is visible and gated alike (no documents,
        not compact, a whole key block), which need no mask. Empty when there are none."""
        lo, hi = self.kv_range(i)
        if self.has_segments or self.compact:
            return hi, hi
        bk = self.block_k
        first = self.offset + i * self.block_q
        last = self.offset + jnp.minimum((i + 1) * self.block_q, self.t) - 1
        b = jnp.int32(self.s // bk)
        if self.causal:
            b = jnp.minimum(b, lax.div(jnp.maximum(first + 1, 0), bk))
        if self.local_window is not None:
            b = jnp.minimum(b, lax.div(jnp.maximum(first - self.local_window + 1, 0), bk))
        a = lo
        if self.sliding_window is not None:
            a = jnp.maximum(a, lax.div(jnp.maximum(last - self.sliding_window + 1, 0) + bk - 1, bk))
        a = jnp.minimum(a, hi)
        return a, jnp.clip(b, a, hi)

    def full_q_range(self, j):
        """[a, b) within q_range(j): the query blocks that see every key of key block j alike (as full_kv_range)."""
        lo, hi = self.q_range(j)
        if self.has_segments or self.compact:
            return hi, hi
        bq = self.block_q
        k_first, k_last = j * self.block_k, (j + 1) * self.block_k - 1
        a = lo
        if self.causal:
            a = jnp.maximum(a, lax.div(jnp.maximum(k_last - self.offset, 0) + bq - 1, bq))
        if self.local_window is not None:
            a = jnp.maximum(a, lax.div(jnp.maximum(k_last + self.local_window - self.offset, 0) + bq - 1, bq))
        b = hi
        if self.sliding_window is not None:
            # Query block i's last real row must be within the window of the block's first key: a prefix of the
            # blocks, all of them when the last real row is.
            reach = k_first + self.sliding_window - self.offset
            b = jnp.minimum(b, jnp.where(self.t <= reach, hi, lax.div(jnp.maximum(reach, 0), bq)))
        # A key block with padded keys needs their mask everywhere.
        a = jnp.where((j + 1) * self.block_k <= self.s, jnp.minimum(a, hi), hi)
        return a, jnp.clip(b, a, hi)

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


def edge_then_inner(lo, a, b, hi, step, carry):
    """Carry through [lo, hi) with step(masked, index, carry): first the edges [lo, a) and [b, hi) as one loop
    with masks, then the inner [a, b) without (two loop bodies to compile, not three)."""
    head = a - lo

    def edge(t, carry):
        return step(True, jnp.where(t < head, lo + t, b + t - head), carry)

    carry = lax.fori_loop(0, head + hi - b, edge, carry)
    return lax.fori_loop(a, b, lambda j, carry: step(False, j, carry), carry)


LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def exp_of(plan: Plan):
    """The exponential of the plan's logits: jnp.exp, or jnp.exp2 for base-2 ones (plan.exp2)."""
    return jnp.exp2 if plan.exp2 else jnp.exp


def lse_of(plan: Plan, m, l):
    """The natural log-sum-exp of a row from its running max m and sum l (in the logits' base)."""
    return m + jnp.log(l) if not plan.exp2 else (m + jnp.log2(l)) * LN2


def in_logit_base(plan: Plan, lse):
    """A natural log-sum-exp in the base of the plan's logits."""
    return lse * LOG2E if plan.exp2 else lse


def online_softmax_step(m, l, acc, s, v, exp=jnp.exp):
    """One key tile of the online softmax: running row max m [R,1], row sum l [R,1] and output acc [R,Dv] (fp32)
    updated with logits s [R,bk] (-inf where masked) and values v [bk,Dv]; exp is jnp.exp2 for base-2 logits. A
    row that has seen no visible key keeps max -inf; it is shifted by 0 so exp stays exp(-inf) = 0."""
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = exp(s - m_safe)
    alpha = exp(m - m_safe)
    return m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True), alpha * acc + dot(p.astype(v.dtype), v)


def when_documents_meet(q_doc, k_doc, work, carry):
    """work(carry) if some query of the tile shares a document with some key, else carry unchanged: tiles
    between different documents are skipped, not masked. q_doc [bq, 1], k_doc [1, bk] are sorted document
    indices, -1 past the end of a ragged array (None: no documents, always work)."""
    if q_doc is None:
        return work(carry)
    # Rows past the end read as -1 (`forward.query_column`); they must not widen the block's range.
    q_lo = jnp.min(jnp.where(q_doc >= 0, q_doc, jnp.iinfo(jnp.int32).max))
    k_lo = jnp.min(jnp.where(k_doc >= 0, k_doc, jnp.iinfo(jnp.int32).max))
    meet = (q_lo <= jnp.max(k_doc)) & (k_lo <= jnp.max(q_doc))
    return lax.cond(meet, work, lambda c: c, carry)


def dot(a, b, *, contract=(1, 0)):
    """a @ b contracting a's axis contract[0] with b's axis contract[1], fp32 accumulation; fp32 operands get
    full-precision products (no TF32 or bf16 passes)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           preferred_element_type=jnp.float32, precision=precision)


def load(ref, index=(), *, rows=None, cols=None, other=0):
    """ref[index], a [rows, cols] tile or a row vector, with its rows from `rows` on (a count, traced or None)
    and its columns from `cols` on (static or None) read as `other`: the reads past the end of a ragged array.
    Triton would read them from whatever memory follows, interpret mode gives NaN, and 0 x NaN is NaN."""
    view = ref.at[index] if index else ref
    mask = _bounds(view.shape, rows, cols)
    return view[...] if mask is None else pltriton.load(view, mask=mask, other=other)


def store(ref, value, index=(), *, rows=None, cols=None):
    """ref[index] = value, writing only the rows before `rows` and the columns before `cols` (as `load`):
    a partial block's writes past the end would land on the next sequence's rows."""
    view = ref.at[index] if index else ref
    mask = _bounds(view.shape, rows, cols)
    if mask is None:
        view[...] = value
    else:
        pltriton.store(view, value, mask=mask)


def _bounds(shape, rows, cols):
    """The mask of `load` and `store`: a [r, 1] row bound and a [1, c] column bound, broadcast only where both
    apply (a mask constant along the columns keeps Triton's loads vectorized and holds fewer registers)."""
    ones = (1,) * (len(shape) - 1)
    mask = None if rows is None else lax.broadcasted_iota(jnp.int32, shape[:1] + ones, 0) < rows
    if cols is not None and len(shape) > 1:
        in_cols = lax.broadcasted_iota(jnp.int32, ones + shape[-1:], len(shape) - 1) < cols
        mask = in_cols if mask is None else mask & in_cols
    return mask


def pick(ref, row: int, i):
    """Entry [row, i] of a small int table block (the compact ranges) as a scalar: a masked sum, since Triton
    cannot index a loaded value."""
    values = ref[row:row + 1, :]
    return jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, values.shape, 1) == i, values, 0))


def logits(plan: Plan, q, k, i, j, gate=None, q_doc=None, k_doc=None, *, masked=True, keys_major=False,
           k_pos=None, q_start=None):
    """Masked fp32 logits [bq, bk] of tile (i, j) (base 2 when plan.exp2) and the gated-key mask (None when the
    gate covers every key).

    q [bq, D], k [bk, D]; gate [1, bk] fp32; q_doc [bq, 1] and k_doc [1, bk] document indices. Masked entries are
    -inf, so exp gives an exact 0 with a zero derivative. Compact keys (plan.compact) bring their positions k_pos
    [1, bk]: a query sees one at t - k_pos >= local_window (empty slots sit at compact.FAR), gate added.

    keys_major: the tile is [bk, bq] (keys on rows; gate and k_doc [bk, 1], q_doc [1, bq]), so per-query rows
    (lse, delta) broadcast lane-dense in the TPU dk/dv kernel. masked=False is for a tile that `blocks` calls
    FULL (every pair visible, the gate on every pair): the scaled dot plus the gate, with no compare at all.
    q_start: the first query row of a tile read shifted back from block i's (the ragged last block read in
    bounds); its rows before block i are masked.
    """
    s = (dot(k, q, contract=(1, 1)) if keys_major else dot(q, k, contract=(1, 1))) * (
        plan.scale * LOG2E if plan.exp2 else plan.scale)
    if gate is not None and plan.exp2:
        gate = gate * LOG2E
    if not masked:
        return (s if gate is None else s + gate), None
    q_axis = 1 if keys_major else 0
    q_row = (i * plan.block_q if q_start is None else q_start) + lax.broadcasted_iota(jnp.int32, s.shape, q_axis)
    q_pos = plan.offset + q_row
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
    if q_start is not None:
        visible &= q_row >= i * plan.block_q
    return jnp.where(visible, s, -jnp.inf), gated
