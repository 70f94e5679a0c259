"""A pruned KV cache that holds a bounded number of keys per layer, sequence and KV head: a ring of the last
`window` tokens and a store of `capacity` older ones. SP-KV's decode cache and every cache policy
(`attention.cache_policies`) are this one structure; they differ only in the score and admission bit they
give each token.

Layout (one dict per layer; slots are time-major like a dense cache, so the decode op reads them in place):

    <entry> [B, R + C, Hkv, dim]   one array per cached vector (k, v; k alone under K=V sharing)
    pos     [B, R + C, Hkv] int32  the token position each slot holds, -1: empty
    score   [B, R + C, Hkv] fp32   what decides which key a full store drops (the policy's: utility, attention mass, ...)
    admit   [B, R, Hkv] bool       per ring slot: whether its token may enter the store when it leaves the ring
    stored  [B, Hkv] int32         keys in the store
    evicted [B, Hkv] int32         keys dropped because the store was full (a closed gate is no eviction)

Slots [0, R) are the ring (token p at slot p % R), slots [R, R + C) the store, filled in order at each head's
own length: a head holds exactly slots [0, length) with length = min(position + 1, R) + stored (the ring is
full before anything leaves it), which is what decode reads (`lengths`).

Overflow: when an admitted key leaves the ring and the store is full, the key with the lowest score among
the store's and the newcomer is dropped and counted in `evicted`; a newcomer that beats the weakest stored key
takes its slot, so the store stays contiguous. Evicting rather than refusing keeps a jitted decode running
(nothing can be raised mid-sequence), and dropping the lowest score is what the policy itself ranks as least
useful: for SP-KV, the lowest predicted utility, i.e. the key a higher threshold would have dropped first.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

META = ("pos", "score", "admit", "stored", "evicted")


def ring_slots(window: int, max_len: int) -> int:
    return min(window, max_len)


def store_slots(capacity: int | float | None, window: int, max_len: int) -> int:
    """Store slots for `capacity`: None -> every key that can leave the ring (no eviction ever); a float in
    (0, 1] -> that share of them; an int -> that many keys. Never more than can leave the ring."""
    older = max(max_len - ring_slots(window, max_len), 0)
    if capacity is None:
        return older
    if isinstance(capacity, float):
        return min(math.ceil(capacity * older), older)
    return min(int(capacity), older)


def init(batch: int, n_kv_heads: int, dims: dict[str, int], dtype, *, ring: int, capacity: int) -> dict:
    """An empty cache of `ring` + `capacity` slots holding, per slot and KV head, one vector per entry of `dims`
    (name -> width)."""
    slots = ring + capacity
    cache = {name: jnp.zeros((batch, slots, n_kv_heads, dim), dtype) for name, dim in dims.items()}
    cache["pos"] = jnp.full((batch, slots, n_kv_heads), -1, jnp.int32)
    cache["score"] = jnp.zeros((batch, slots, n_kv_heads), jnp.float32)
    cache["admit"] = jnp.zeros((batch, ring, n_kv_heads), bool)
    cache["stored"] = jnp.zeros((batch, n_kv_heads), jnp.int32)
    cache["evicted"] = jnp.zeros((batch, n_kv_heads), jnp.int32)
    return cache


def is_pruned(cache) -> bool:
    return isinstance(cache, dict) and set(META) <= set(cache)


def append(cache: dict, entries: dict[str, jax.Array], position, *, score: jax.Array, admit: jax.Array) -> dict:
    """Add the token at `position`: its `entries` [B,1,Hkv,dim], its `score` and admission bit [B,Hkv]. The
    token it replaces in the ring moves to the store if admitted (see the module docstring for a full store)."""
    B, R, H = cache["admit"].shape
    C = cache["pos"].shape[1] - R
    slot = position % R
    b_B1, h_1H = jnp.arange(B)[:, None], jnp.arange(H)[None, :]
    leaving_pos = cache["pos"][:, slot]
    leaving_score = cache["score"][:, slot]
    moves = cache["admit"][:, slot] & (leaving_pos >= 0)
    stored = cache["stored"]
    dropped = R + C  # an out-of-range slot: writes there are dropped
    if C:
        full = stored >= C
        store_score = cache["score"][:, R:]
        weakest = jnp.argmin(store_score, axis=1)
        wins = leaving_score > jnp.take_along_axis(store_score, weakest[:, None], axis=1)[:, 0]
        dest = jnp.where(full, jnp.where(wins, R + weakest, dropped), R + stored)
    else:
        full, dest = jnp.ones_like(moves), jnp.full_like(stored, dropped)
    dest = jnp.where(moves, dest, dropped)
    new = dict(cache)

    def shift(buf, incoming):
        buf = buf.at[b_B1, dest, h_1H].set(buf[:, slot], mode="drop")
        return buf.at[:, slot].set(incoming.astype(buf.dtype))

    for name, e_B1HD in entries.items():
        new[name] = shift(cache[name], e_B1HD[:, 0])
    new["pos"] = shift(cache["pos"], jnp.full(leaving_pos.shape, position, jnp.int32))
    new["score"] = shift(cache["score"], score)
    new["admit"] = cache["admit"].at[:, slot].set(admit)
    new["stored"] = stored + (moves & ~full)
    new["evicted"] = cache["evicted"] + (moves & full)
    return new


def lengths(cache: dict, position) -> jax.Array:
    """[B,Hkv] slots each head holds after the token at `position` was appended: slots [0, length)."""
    ring = cache["admit"].shape[1]
    return jnp.minimum(position + 1, ring) + cache["stored"]


def occupancy(cache: dict) -> jax.Array:
    """[B,Hkv] entries a pruned cache holds per KV head (the occupied ring slots plus the store)."""
    return jnp.sum(cache["pos"] >= 0, axis=1)


def entry_bytes(cache: dict) -> int:
    """Bytes of one slot's cached vectors (keys and values; the mixers name them k and v) for one KV head."""
    return sum(cache[n].shape[-1] * jnp.dtype(cache[n].dtype).itemsize for n in ("k", "v") if n in cache)

