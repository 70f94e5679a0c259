"""Which (query block, key block) tiles a flash kernel computes, and whether a tile needs its masks.

Every tile is one of three kinds:

- SKIP: no pair of the tile is visible (causal, window, documents that never meet) or every visible pair has a
  closed SP-KV gate (-inf on every key of the block, and every pair outside the local window). Skipped tiles
  cost neither a load nor a matmul.
- FULL: every pair is visible and the gate (if any) applies to every pair: the tile is the plain scaled dot
  (plus the gate row), with no position or document compare.
- PARTIAL: anything else; the tile computes its masks.

The causal/window part depends only on block indices and is known at trace time (numpy); the document and gate
parts depend on the data and are computed in jnp inside the caller's jit. `block_lists` packs each row's visible
tiles into a list that a pipelined kernel walks one grid step per entry: entry = block << 2 | kind, the visible
blocks first in increasing order, then padding entries that repeat the last visible block with kind SKIP (a
repeated block index makes the pipeline skip its copy, and SKIP skips the compute).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels_pallas.flash.tiles import Plan

SKIP, FULL, PARTIAL = 0, 1, 2
KIND_BITS = 2


def static_kinds(plan: Plan) -> np.ndarray:
    """[nq, nk] kinds from causal, window and the ragged last key block alone (numpy, trace time)."""
    i = np.arange(plan.num_q_blocks)[:, None]
    j = np.arange(plan.num_k_blocks)[None, :]
    q_first = plan.offset + i * plan.block_q
    q_last = plan.offset + np.minimum((i + 1) * plan.block_q, plan.t) - 1
    k_first = j * plan.block_k
    k_last = np.minimum((j + 1) * plan.block_k, plan.s) - 1
    # A tile's relative positions t - s cover every integer in [rel_min, rel_max].
    rel_min, rel_max = q_first - k_last, q_last - k_first
    some = np.ones(rel_min.shape, bool)
    every = np.broadcast_to((j + 1) * plan.block_k <= plan.s, rel_min.shape).copy()
    if plan.causal:
        some &= rel_max >= 0
        every &= rel_min >= 0
    if plan.sliding_window is not None:
        some &= rel_min < plan.sliding_window
        every &= rel_max < plan.sliding_window
    if plan.has_gate and plan.local_window is not None:
        # The gate applies to the whole tile only if every pair is outside the local window.
        every &= rel_min >= plan.local_window
    return np.where(some, np.where(every, FULL, PARTIAL), SKIP).astype(np.int32)


def gate_covers(plan: Plan) -> np.ndarray:
    """[nq, nk] bool: the gate applies to every pair of the tile that causal and window leave visible (so a
    gate closed on every key of the block closes the tile)."""
    if plan.local_window is None:
        return np.ones((plan.num_q_blocks, plan.num_k_blocks), bool)
    i = np.arange(plan.num_q_blocks)[:, None]
    j = np.arange(plan.num_k_blocks)[None, :]
    rel_min = plan.offset + i * plan.block_q - (np.minimum((j + 1) * plan.block_k, plan.s) - 1)
    if plan.causal:
        rel_min = np.maximum(rel_min, 0)
    return rel_min >= plan.local_window


def tile_kinds(plan: Plan, gate=None, q_doc=None, k_doc=None):
    """[Bm, Hm, nq, nk] int32 kinds of every tile (Bm = B with documents or a gate, else 1; Hm = Hkv with a
    gate, else 1).

    gate [B,Hkv,1,Sp] fp32, padded with -inf; q_doc [B,1,Tp] and k_doc [B,1,Sp] sorted document indices,
    edge-padded (so a block's range is as tight as its real rows).
    """
    kinds = jnp.asarray(static_kinds(plan))[None, None]
    if q_doc is not None:
        nq, nk = plan.num_q_blocks, plan.num_k_blocks
        qd = q_doc[:, 0].reshape(q_doc.shape[0], nq, plan.block_q)
        kd = k_doc[:, 0].reshape(k_doc.shape[0], nk, plan.block_k)
        q_lo, q_hi = qd.min(-1)[:, None, :, None], qd.max(-1)[:, None, :, None]
        k_lo, k_hi = kd.min(-1)[:, None, None, :], kd.max(-1)[:, None, None, :]
        meet = (q_lo <= k_hi) & (k_lo <= q_hi)
        one_doc = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
        mixed = jnp.where(kinds > 0, PARTIAL, SKIP)
        kinds = jnp.where(meet, jnp.where(one_doc, kinds, mixed), SKIP)
    if gate is not None:
        B, H = gate.shape[:2]
        closed = jnp.all(gate[:, :, 0].reshape(B, H, plan.num_k_blocks, plan.block_k) == -jnp.inf, axis=-1)
        shut = closed[:, :, None, :] & jnp.asarray(gate_covers(plan))[None, None]
        kinds = jnp.where(shut, SKIP, kinds)
    return kinds.astype(jnp.int32)


def steps(plan: Plan, *, by_query: bool = True) -> int:
    """The static bound on a row's visible tiles: the grid length of a pipelined kernel's sequential axis
    (rows are query blocks when by_query, key blocks otherwise)."""
    visible = static_kinds(plan) > 0
    return max(1, int(visible.sum(axis=1 if by_query else 0).max()))


@dataclasses.dataclass(frozen=True)
class Lists:
    """entries [Bm, Hm, rows, steps] int32 (block << 2 | kind) and which grid indices pick its first axes."""

    entries: object
    per_batch: bool
    per_head: bool

    @property
    def table(self):
        """What the pipeline prefetches into SMEM."""
        return self.entries

    def entry(self, ref, b, h, row, s):
        """The entry of grid step s of a row, read from the prefetched table."""
        return ref[b if self.per_batch else 0, h if self.per_head else 0, row, s]

    def steps(self, plan: Plan, *, by_query: bool):
        return steps(plan, by_query=by_query)


@dataclasses.dataclass(frozen=True)
class Ranges:
    """SP-KV's compact keys (`compact.block_ranges`): each row sees a contiguous range [lo, hi) of blocks,
    table [B, H, 2, rows] int32, so step s's entry is block lo + s (PARTIAL: compact tiles compare positions)
    and, past hi, the range's last block again with kind SKIP. The table is all the pipeline prefetches, and the
    step axis is as long as the longest range of the call (a traced grid bound), not one step per possible
    block."""

    ranges: object

    @property
    def table(self):
        return self.ranges

    def entry(self, ref, b, h, row, s):
        lo, hi = ref[b, h, 0, row], ref[b, h, 1, row]
        block = jnp.minimum(lo + s, jnp.maximum(hi - 1, lo))
        return (block << KIND_BITS) | jnp.where(lo + s < hi, PARTIAL, SKIP)

    def steps(self, plan: Plan, *, by_query: bool):
        return jnp.maximum(jnp.max(self.ranges[:, :, 1] - self.ranges[:, :, 0]), 1)


def block_lists(plan: Plan, kinds, *, by_query: bool = True) -> Lists:
    """Each row's visible tiles, compacted: for every query block the key blocks it sees (by_query), or for
    every key block the query blocks that see it."""
    if not by_query:
        kinds = jnp.swapaxes(kinds, -1, -2)
    n = steps(plan, by_query=by_query)
    visible = kinds > 0
    # Stable: visible blocks first, in increasing order.
    order = jnp.argsort(~visible, axis=-1, stable=True)[..., :n].astype(jnp.int32)
    count = visible.sum(-1, keepdims=True)
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0), axis=-1)
    step = lax.broadcasted_iota(jnp.int32, order.shape, order.ndim - 1)
    live = step < count
    block = jnp.where(live, order, last)
    kind = jnp.where(live, jnp.take_along_axis(kinds, order, axis=-1), SKIP)
    entries = (block << KIND_BITS) | kind
    return Lists(entries=entries, per_batch=kinds.shape[0] > 1, per_head=kinds.shape[1] > 1)
