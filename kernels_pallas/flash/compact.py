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

import jax
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
    """(lo, hi) [n] int32: the compact slots [lo, hi) that some query at positions [q_first[n], q_last[n]] may
    see in some (sequence, kv head) (slots are sorted by position, FAR last)."""
    pos_RS = jnp.moveaxis(position_BSH, 1, -1).reshape(-1, position_BSH.shape[1])

    def search(bound, side):
        return jax.vmap(lambda row: jnp.searchsorted(row, bound, side=side).astype(jnp.int32))(pos_RS)

    hi = jnp.max(search(q_last - local_window, "right"), axis=0)
    if sliding_window is None:
        return jnp.zeros_like(hi), hi
    lo = jnp.min(search(q_first - sliding_window + 1, "left"), axis=0)
    return jnp.minimum(lo, hi), hi
