"""SP-KV's compact keys: the keys a gate keeps, gathered per (sequence, kv head) in order with their positions.

With a hard gate (0 or -inf) the kept keys are scattered: at density 0.1 a 128-key block is entirely closed with
probability 0.9^128 ~ 1e-6, so skipping closed blocks saves nothing. Attention under SP-KV splits instead into

- the local window: keys with 0 <= t - s < local_window, never gated: a banded attention over the dense keys;
- the compact keys: every key whose gate is not -inf, gathered to the front of a per-(sequence, kv head) array
  with its position (what the pruned decode cache holds); query t sees compact key c when
  t - position[c] >= local_window (and the sliding window and documents allow), with the gate added.

Together they are exactly the dense op's pairs minus those a -inf gate removes, so the cost of the far part
follows the density. The gather is differentiable (its gradient is a scatter-add into dk, dv and the gate).
Slots past a head's count hold zeros at the position `FAR`, which no query sees.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp

# The position of an empty compact slot: farther in the future than any query, so t - FAR < 0 never passes.
FAR = 1 << 30


def kept_order(gate_BSH):
    """(index [B,S,H] int32, position [B,S,H] int32, count [B,H] int32): slot c of head h holds key index[b,c,h]
    at position[b,c,h]; the kept keys (gate > -inf) fill slots [0, count) in increasing position, the other
    slots have index 0 and position FAR."""
    kept = gate_BSH > -jnp.inf
    # Stable: kept keys first, each group in increasing position.
    order = jnp.argsort(~kept, axis=1, stable=True).astype(jnp.int32)
    count = jnp.sum(kept, axis=1, dtype=jnp.int32)
    live = jnp.arange(gate_BSH.shape[1], dtype=jnp.int32)[None, :, None] < count[:, None, :]
    return jnp.where(live, order, 0), jnp.where(live, order, FAR), count


def gather(x_BSH, index_BSH, position_BSH):
    """x [B,S,H,...] at the compact slots: [B,S,H,...], zero in the empty ones (so a closed key is never
    read, whatever it holds)."""
    expand = (1,) * (x_BSH.ndim - 3)
    x = jnp.take_along_axis(x_BSH, index_BSH.reshape(index_BSH.shape + expand), axis=1)
    return jnp.where((position_BSH < FAR).reshape(position_BSH.shape + expand), x, 0)


def visible_slots(position_BSH, q_first, q_last, *, local_window: int, sliding_window: int | None):
    """(lo, hi) [B,H,n] int32: the compact slots [lo, hi) of each (sequence, kv head) that some query at
    positions [q_first[n], q_last[n]] may see (slots are sorted by position, FAR last)."""
    pos_BHS = jnp.swapaxes(position_BSH, 1, 2)

    def search(bound, side):
        find = functools.partial(jnp.searchsorted, side=side)
        return jnp.vectorize(lambda row: find(row, bound).astype(jnp.int32), signature="(s)->(n)")(pos_BHS)

    hi = search(q_last - local_window, "right")
    if sliding_window is None:
        return jnp.zeros_like(hi), hi
    return jnp.minimum(search(q_first - sliding_window + 1, "left"), hi), hi


def block_ranges(position_BSH, *, t: int, offset: int, block_q: int, block_k: int, local_window: int,
                 sliding_window: int | None, widths: tuple[int, int]):
    """The loop bounds of a kernel over compact keys, per (sequence, kv head), as int32 tables [B,H,2,width]:

    - by query block i: the compact blocks [lo, hi) that some query of the block may see;
    - by compact block c: the query blocks [lo, hi) with a query that may see one of its keys.

    Queries are t rows at positions offset + row; entries past the real blocks are empty ranges (widths pad
    the tables to what a kernel's block may need, e.g. a power of two for Triton)."""
    B, S, H = position_BSH.shape
    nq, nc = -(-t // block_q), -(-S // block_k)
    rows = jnp.arange(nq, dtype=jnp.int32) * block_q
    lo, hi = visible_slots(position_BSH, offset + rows, offset + jnp.minimum(rows + block_q, t) - 1,
                           local_window=local_window, sliding_window=sliding_window)
    by_query = jnp.stack([lo // block_k, jnp.where(hi > lo, -(-hi // block_k), lo // block_k)], axis=2)

    pos = jnp.pad(jnp.swapaxes(position_BSH, 1, 2), ((0, 0), (0, 0), (0, nc * block_k - S)), constant_values=FAR)
    pos = pos.reshape(B, H, nc, block_k)
    first = jnp.min(pos, axis=-1)
    last = jnp.max(jnp.where(pos < FAR, pos, -1), axis=-1)
    row_lo = jnp.maximum(first + local_window - offset, 0)
    row_hi = t if sliding_window is None else jnp.minimum(last + sliding_window - offset, t)
    seen = (first < FAR) & (row_hi > row_lo)
    by_key = jnp.stack([jnp.where(seen, row_lo // block_q, 0), jnp.where(seen, -(-row_hi // block_q), 0)], axis=2)

    def pad(x, width):
        return jnp.pad(x.astype(jnp.int32), ((0, 0), (0, 0), (0, 0), (0, width - x.shape[-1])))

    return pad(by_query, widths[0]), pad(by_key, widths[1])
