"""A pruned KV cache that holds a bounded number of keys per layer: per (sequence, KV head) pair a ring of the last
`window` tokens, and a store of older keys in pages of a pool that the batch's pairs share. SP-KV's decode cache
and every cache policy (`attention.cache_policies`) are this one structure; they differ only in the score and
admission bit they give each token.

Layout (one dict per layer; the ring is time-major like a dense cache and the pool page-major, so the decode op
reads both in place):

    <entry>    [B, R, Hkv, dim]        the ring: one array per cached vector (k, v; k alone under K=V sharing)
    pos        [B, R, Hkv] int32       the token position each ring slot holds, -1: empty
    score      [B, R, Hkv] fp32        what decides which key a full store drops (the policy's: utility, mass, ...)
    admit      [B, R, Hkv] bool        per ring slot: whether its token may enter the store when it leaves the ring
    pages      {entry: [P, page, dim]} the pool of P pages of `page` slots
    page_pos   [P, page] int32         the token position each pool slot holds, -1: empty
    page_score [P, page] fp32          the score of each pool slot's key
    table      [B, Hkv, n] int32       each pair's pages in order (-1: none yet)
    owner      [P] int32               the pair (b * Hkv + h) a page belongs to, -1: free
    used       [] int32                pages handed out: [0, used) are owned, `used` is the next free one
    stored     [B, Hkv] int32          keys in each pair's store (its slot i: row i % page of page table[b, h, i // page])
    evicted    [B, Hkv] int32          keys dropped because no room was left (a closed gate is no eviction)

Ring slot p % R holds token p, so a pair reads ring slots [0, min(position + 1, R)) and store slots
[0, stored) (`ring_lengths`, `key_pages`).

Sizes: the pool holds each pair's share of `capacity` keys rounded up to whole pages, P = B * Hkv * ceil(C / page);
allocated bytes are the ring plus the pool (and the table, a few ints per page). Pages are handed out as pairs
need them, so a pair of a dense sequence or head takes pages that sparser pairs leave free: the batch evicts
only when its pairs' stores together outgrow the pool, and what a pair's store leaves unused is at most the rest
of its last page.

Appending: a key the policy admits moves to its pair's store when it leaves the ring. A pair whose last page has
room writes there; a pair whose pages are full takes the next free page (pairs needing one in the same step
take them in (sequence, head) order). Only when no free page is left does anything go: the key of lowest score
among the pair's own store and the newcomer is dropped and counted in `evicted` (a newcomer that beats the
weakest stored key takes its slot, so the store stays contiguous). The victim comes from the pair that needs
room, not from another pair, because taking a slot from another pair would leave a hole in its store mid-step;
and the lowest score is what the policy itself ranks least useful: for SP-KV, the lowest predicted utility, the
key a higher threshold would have dropped first. Evicting rather than refusing keeps a jitted decode running
(nothing can be raised mid-sequence). Pages are never handed back within a generation: a store only grows.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attention.ops.softmax.api import KeyPages, paged_dense

META = ("pos", "score", "admit", "pages", "page_pos", "page_score", "table", "owner", "used", "stored", "evicted")
PAGE = 64  # the default page: large enough to read well, small enough that a pair wastes little of its last one


def ring_slots(window: int, max_len: int) -> int:
    return min(window, max_len)


def store_slots(capacity: int | float | None, window: int, max_len: int) -> int:
    """Store slots per pair for `capacity`: None -> every key that can leave the ring (no eviction ever); a float
    in (0, 1] -> that share of them; an int -> that many keys. Never more than can leave the ring."""
    older = max(max_len - ring_slots(window, max_len), 0)
    if capacity is None:
        return older
    if isinstance(capacity, float):
        return min(math.ceil(capacity * older), older)
    return min(int(capacity), older)


def page_size(store: int) -> int:
    """The default page for a store of `store` slots per pair: PAGE, or a smaller store whole (one page per pair,
    nothing rounded up). (The GPU kernel reads pages of a power of two >= 16 keys; the xla decode any.)"""
    return max(min(PAGE, store), 1)


def init(batch: int, n_kv_heads: int, dims: dict[str, int], dtype, *, ring: int, capacity: int, older: int,
         page: int) -> dict:
    """An empty cache: rings of `ring` slots and a pool of pages of `page` slots holding `capacity` keys per
    (sequence, KV head) pair on average (each pair's share rounded up to whole pages), one vector per slot and
    entry of `dims` (name -> width). `older`: the keys that can ever leave a ring (a pair never needs more pages
    than hold them)."""
    if page < 1:
        raise ValueError(f"a page holds at least one key; got {page}")
    n_pages = batch * n_kv_heads * -(-min(capacity, older) // page)
    width = min(-(-older // page), n_pages)
    cache = {name: jnp.zeros((batch, ring, n_kv_heads, dim), dtype) for name, dim in dims.items()}
    cache["pos"] = jnp.full((batch, ring, n_kv_heads), -1, jnp.int32)
    cache["score"] = jnp.zeros((batch, ring, n_kv_heads), jnp.float32)
    cache["admit"] = jnp.zeros((batch, ring, n_kv_heads), bool)
    cache["pages"] = {name: jnp.zeros((n_pages, page, dim), dtype) for name, dim in dims.items()}
    cache["page_pos"] = jnp.full((n_pages, page), -1, jnp.int32)
    cache["page_score"] = jnp.zeros((n_pages, page), jnp.float32)
    cache["table"] = jnp.full((batch, n_kv_heads, width), -1, jnp.int32)
    cache["owner"] = jnp.full((n_pages,), -1, jnp.int32)
    cache["used"] = jnp.zeros((), jnp.int32)
    cache["stored"] = jnp.zeros((batch, n_kv_heads), jnp.int32)
    cache["evicted"] = jnp.zeros((batch, n_kv_heads), jnp.int32)
    return cache


def is_pruned(cache) -> bool:
    return isinstance(cache, dict) and set(META) <= set(cache)


def append(cache: dict, entries: dict[str, jax.Array], position, *, score: jax.Array, admit: jax.Array) -> dict:
    """Add the token at `position`: its `entries` [B,1,Hkv,dim], its `score` and admission bit [B,Hkv]. The
    token it replaces in the ring moves to its pair's store if admitted (see the module docstring for where it
    goes and what a full pool drops)."""
    B, R, H = cache["admit"].shape
    P, page = cache["page_pos"].shape
    slot = position % R
    leaving_pos = cache["pos"][:, slot]
    leaving_score = cache["score"][:, slot]
    moves = cache["admit"][:, slot] & (leaving_pos >= 0)
    stored, table, owner, used = cache["stored"], cache["table"], cache["owner"], cache["used"]
    dropped = P * page  # an out-of-range pool slot: writes there are dropped
    if P:
        table, owner, used, room = _take_pages(table, owner, used, moves, stored, page)
        last = jnp.take_along_axis(table, jnp.minimum(stored // page, table.shape[-1] - 1)[..., None], axis=2)[..., 0]
        full = moves & ~room
        weakest_score, weakest_slot = jax.lax.cond(
            jnp.any(full), lambda: _weakest(cache["page_pos"], cache["page_score"], owner, (B, H)),
            lambda: (jnp.full((B, H), jnp.inf), jnp.full((B, H), dropped, jnp.int32)))
        wins = leaving_score > weakest_score
        dest = jnp.where(room, last * page + stored % page, jnp.where(full & wins, weakest_slot, dropped))
    else:
        room, full, dest = jnp.zeros_like(moves), moves, jnp.full_like(stored, dropped)
    dest = jnp.where(moves, dest, dropped).reshape(-1)

    def to_pool(pool, leaving):  # the leaving ring tokens' [B, Hkv, ...] into their pool slots
        flat = pool.reshape(P * page, *pool.shape[2:])
        return flat.at[dest].set(leaving.reshape(B * H, *leaving.shape[2:]).astype(pool.dtype),
                                 mode="drop").reshape(pool.shape)

    new = dict(cache)
    for name, e_B1HD in entries.items():
        new["pages"] = {**new["pages"], name: to_pool(cache["pages"][name], cache[name][:, slot])}
        new[name] = cache[name].at[:, slot].set(e_B1HD[:, 0].astype(cache[name].dtype))
    new["page_pos"] = to_pool(cache["page_pos"], leaving_pos)
    new["page_score"] = to_pool(cache["page_score"], leaving_score)
    new["pos"] = cache["pos"].at[:, slot].set(position)
    new["score"] = cache["score"].at[:, slot].set(score.astype(jnp.float32))
    new["admit"] = cache["admit"].at[:, slot].set(admit)
    new.update(table=table, owner=owner, used=used, stored=stored + room, evicted=cache["evicted"] + full)
    return new


def _take_pages(table, owner, used, moves, stored, page):
    """Pairs whose pages are full and that store a key now take the next free pages, in (sequence, head) order,
    while any are left. Returns the table, owner and used count after that, and [B,Hkv] whether each moving pair
    has room for its key."""
    B, H, width = table.shape
    P = owner.shape[0]
    need = moves & (stored % page == 0) & (stored // page < width)
    flat = need.reshape(-1).astype(jnp.int32)
    new_page = (used + jnp.cumsum(flat) - flat).reshape(B, H)
    granted = need & (new_page < P)
    b_B1, h_1H = jnp.arange(B)[:, None], jnp.arange(H)[None, :]
    table = table.at[b_B1, h_1H, jnp.where(granted, stored // page, width)].set(new_page, mode="drop")
    owner = owner.at[jnp.where(granted, new_page, P).reshape(-1)].set(jnp.arange(B * H, dtype=jnp.int32),
                                                                      mode="drop")
    room = moves & ((stored % page != 0) | granted)
    return table, owner, used + jnp.sum(granted, dtype=jnp.int32), room


def _weakest(page_pos, page_score, owner, shape: tuple[int, int]):
    """([B,Hkv] the lowest score in each pair's store, [B,Hkv] its pool slot; ties: the earliest slot of the
    store), by segments of the pool's slots per owner: one pass over the pool, not one per pair. A pair with an
    empty store gets +inf and an out-of-range slot."""
    P, page = page_pos.shape
    pairs = shape[0] * shape[1]
    held = (page_pos >= 0).reshape(-1)
    s = jnp.where(held, page_score.reshape(-1), jnp.inf)
    seg = jnp.repeat(jnp.where(owner >= 0, owner, pairs), page)
    lowest = jax.ops.segment_min(s, seg, num_segments=pairs)
    at_lowest = held & (s == lowest[jnp.minimum(seg, pairs - 1)])
    # Within a pair, pool order is store order: its pages are handed out in increasing order.
    slot = jax.ops.segment_min(jnp.where(at_lowest, jnp.arange(P * page), P * page), seg, num_segments=pairs)
    return lowest.reshape(shape), jnp.minimum(slot, P * page).reshape(shape)


def ring_lengths(cache: dict, position) -> jax.Array:
    """[B,Hkv] ring slots each pair holds after the token at `position` was appended: slots [0, length)."""
    B, R, H = cache["admit"].shape
    return jnp.full((B, H), jnp.minimum(position + 1, R), jnp.int32)


def key_pages(cache: dict, value: str = "v") -> KeyPages:
    """The store as the decode op's paged source: keys from the pool's "k", values from its `value` entry (the
    very same array under K=V), each pair up to its stored count, with the slots' positions."""
    pool = cache["pages"]
    return KeyPages(pool["k"], pool[value], cache["table"], cache["stored"], cache["page_pos"])


def dense_view(cache: dict, position) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The held keys laid out densely per pair, the ring's slots then the store's: (keys [B,S',Hkv,D], positions
    [B,S',Hkv], held [B,S',Hkv]). For the passes that need every held key at once (H2O's attention mass)."""
    pk, _, p_held, p_pos, _ = paged_dense(key_pages(cache, "k"))
    R = cache["admit"].shape[1]
    ring_held = jnp.broadcast_to((jnp.arange(R) < jnp.minimum(position + 1, R))[None, :, None], cache["pos"].shape)
    return (jnp.concatenate([cache["k"], pk], axis=1), jnp.concatenate([cache["pos"], p_pos], axis=1),
            jnp.concatenate([ring_held, p_held], axis=1))


def add_scores(cache: dict, add_BSH: jax.Array) -> dict:
    """The cache with `add_BSH` [B, R + n * page, Hkv] (laid out as `dense_view`) added to its slots' scores."""
    B, R, H = cache["admit"].shape
    P, page = cache["page_pos"].shape
    table = cache["table"]
    n = table.shape[-1]
    if not P or not n:
        return {**cache, "score": cache["score"] + add_BSH[:, :R]}
    # Row j * page + r of pair (b, h) is slot r of page table[b, h, j]; entries past a pair's pages add nothing.
    add_BHnp = jnp.moveaxis(add_BSH[:, R:].reshape(B, n, page, H), 3, 1)
    ids = jnp.where(table >= 0, table, P)
    page_score = cache["page_score"].at[ids].add(add_BHnp, mode="drop")
    return {**cache, "score": cache["score"] + add_BSH[:, :R], "page_score": page_score}


def occupancy(cache: dict) -> jax.Array:
    """[B,Hkv] keys each pair holds (the occupied ring slots plus the store)."""
    return jnp.sum(cache["pos"] >= 0, axis=1) + cache["stored"]


def slots_per_pair(cache: dict) -> tuple[int, int]:
    """(ring slots, pool slots per (sequence, KV head) pair: its share) a cache allocates."""
    B, R, H = cache["admit"].shape
    P, page = cache["page_pos"].shape
    return R, P * page // (B * H)


def waste(cache: dict) -> jax.Array:
    """[B,Hkv] pool slots each pair owns but does not use: the rest of its last page."""
    page = cache["page_pos"].shape[1]
    return -(-cache["stored"] // page) * page - cache["stored"]


def entry_bytes(cache: dict) -> int:
    """Bytes of one slot's cached vectors (keys and values; the mixers name them k and v) for one KV head."""
    return sum(cache[n].shape[-1] * jnp.dtype(cache[n].dtype).itemsize for n in ("k", "v") if n in cache)
