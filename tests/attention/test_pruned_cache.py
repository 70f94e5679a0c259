"""The pruned KV cache (attention/pruned_cache.py): ring and store, appends at each head's own length, the
overflow policy (the lowest score is dropped and counted), capacities, and decode through it against dense
attention under the mask of the keys a plain-Python simulation of the same rules says are held."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import ops, pruned_cache
from tests.numerics import assert_close


def _fill(scores_BTH, admits_BTH, *, ring, capacity, dims=None, entries_BTHD=None):
    """Append T tokens one by one; returns the cache after each step (a pytree with a leading T axis)."""
    B, T, H = scores_BTH.shape
    dims = dims or {"k": 1}
    entries = entries_BTHD or {"k": jnp.broadcast_to(jnp.arange(T, dtype=jnp.float32)[None, :, None, None],
                                                     (B, T, H, 1))}

    def step(cache, t):
        new = pruned_cache.append(cache, {n: jax.lax.dynamic_slice_in_dim(e, t, 1, axis=1) for n, e in entries.items()},
                                  t, score=scores_BTH[:, t], admit=admits_BTH[:, t])
        return new, new

    cache = pruned_cache.init(B, H, dims, jnp.float32, ring=ring, capacity=capacity)
    return jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(T))[1])(cache)


def _held(cache, b, h) -> set[int]:
    pos = np.asarray(cache["pos"])[b, :, h]
    return set(pos[pos >= 0].tolist())


def simulate(scores_T, admits_T, *, ring, capacity):
    """The rules in plain Python for one sequence and head: per step the set of positions held, and the count
    evicted. The store keeps admitted keys leaving the ring; when full, the lowest score (newcomer included,
    which loses ties) is dropped."""
    store, held, evicted = [], [], 0
    for t in range(len(scores_T)):
        leaving = t - ring
        if leaving >= 0 and admits_T[leaving]:
            if len(store) < capacity:
                store.append(leaving)
            else:
                evicted += 1
                if capacity:
                    weakest = min(store, key=lambda p: (scores_T[p], store.index(p)))
                    if scores_T[leaving] > scores_T[weakest]:
                        store[store.index(weakest)] = leaving
        held.append(set(store) | set(range(max(0, t - ring + 1), t + 1)))
    return held, evicted


def test_store_appends_per_head_and_evicts_the_lowest_score():
    """Ring 2, store 3, 10 tokens; scores are the positions' values below, admission where marked.

    head 0 admits 0, 1, 2, 3, 5, 7 with scores 5, 1, 4, 9, _, 2, _, 3: the store takes 0, 1, 2 (full at step 4,
    when 2 leaves the ring), then 3 (score 9) evicts 1 (score 1), 5 (score 2) loses to the weakest (4) and is
    dropped, 7 (score 3) too: held 0, 2, 3 + ring 8, 9; 3 evictions.
    head 1 admits only 4: held 4 + ring; nothing evicted. Sequence 1 admits nothing: the ring only.
    """
    T, ring, capacity = 10, 2, 3
    s = np.array([5, 1, 4, 9, 0, 2, 0, 3, 0, 0], np.float32)
    scores = np.zeros((2, T, 2), np.float32)
    scores[0, :, 0] = s
    admits = np.zeros((2, T, 2), bool)
    admits[0, [0, 1, 2, 3, 5, 7], 0] = True
    admits[0, 4, 1] = True
    steps = _fill(jnp.asarray(scores), jnp.asarray(admits), ring=ring, capacity=capacity)
    last = jax.tree.map(lambda x: x[-1], steps)
    assert _held(last, 0, 0) == {0, 2, 3, 8, 9}
    assert _held(last, 0, 1) == {4, 8, 9}
    assert _held(last, 1, 0) == _held(last, 1, 1) == {8, 9}
    np.testing.assert_array_equal(last["stored"], [[3, 1], [0, 0]])
    np.testing.assert_array_equal(last["evicted"], [[3, 0], [0, 0]])
    np.testing.assert_array_equal(pruned_cache.lengths(last, T - 1), [[5, 3], [2, 2]])
    # Every held slot lies in [0, length), and the entries moved with their positions.
    pos, k = np.asarray(last["pos"]), np.asarray(last["k"])[..., 0]
    length = np.asarray(pruned_cache.lengths(last, T - 1))
    for b in range(2):
        for h in range(2):
            assert (pos[b, :length[b, h], h] >= 0).all() and (pos[b, length[b, h]:, h] == -1).all()
    np.testing.assert_array_equal(k[pos >= 0], pos[pos >= 0])
    # Step by step, the held sets and the eviction count follow the plain-Python rules.
    for t in range(T):
        held, evicted = simulate(s[:t + 1], admits[0, :t + 1, 0], ring=ring, capacity=capacity)
        assert _held(jax.tree.map(lambda x: x[t], steps), 0, 0) == held[-1], t
        assert int(steps["evicted"][t, 0, 0]) == evicted


def test_zero_capacity_holds_the_window_and_counts_what_it_drops():
    T = 7
    admits = jnp.ones((1, T, 1), bool)
    last = jax.tree.map(lambda x: x[-1], _fill(jnp.zeros((1, T, 1)), admits, ring=3, capacity=0))
    assert _held(last, 0, 0) == {4, 5, 6} and int(last["evicted"][0, 0]) == T - 3
    assert last["pos"].shape == (1, 3, 1)


def test_store_slots_from_capacity():
    # 100 tokens, window 20: 80 keys can leave the window.
    assert pruned_cache.store_slots(None, 20, 100) == 80
    assert pruned_cache.store_slots(0.25, 20, 100) == 20
    assert pruned_cache.store_slots(0.01, 20, 100) == 1  # rounded up
    assert pruned_cache.store_slots(12, 20, 100) == 12
    assert pruned_cache.store_slots(500, 20, 100) == 80  # never more than can leave the window
    assert pruned_cache.store_slots(None, 20, 10) == 0 and pruned_cache.ring_slots(20, 10) == 10


def _dense_attention(q_HD, k_SHD, v_SHD, visible_SH):
    """One query against keys [S,Hkv,D] with a per-head visibility mask, numpy fp64."""
    Hq, Hkv = q_HD.shape[0], k_SHD.shape[1]
    out = np.zeros((Hq, v_SHD.shape[-1]))
    for hq in range(Hq):
        h = hq // (Hq // Hkv)
        s = k_SHD[:, h] @ q_HD[hq] / np.sqrt(q_HD.shape[-1])
        s = np.where(visible_SH[:, h], s, -np.inf)
        p = np.exp(s - s.max())
        out[hq] = (p / p.sum()) @ v_SHD[:, h]
    return out


@pytest.mark.parametrize("capacity", [11, 2])
def test_decode_through_the_cache_is_attention_over_the_held_keys(capacity):
    """Random q, k, v and scores; the read is ops.softmax_decode over the cache's slots. At capacity 11 (every older key) nothing
    is evicted; at 2 the store overflows. Every step equals dense attention under the held set of the
    plain-Python rules, per sequence and KV head (GQA: 4 query heads on 2 KV heads)."""
    rng = np.random.default_rng(0)
    B, T, Hq, Hkv, D, ring = 2, 14, 4, 2, 8, 3
    q = rng.standard_normal((B, T, Hq, D)).astype(np.float32)
    k = rng.standard_normal((B, T, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((B, T, Hkv, D)).astype(np.float32)
    scores = rng.standard_normal((B, T, Hkv)).astype(np.float32)
    admits = rng.random((B, T, Hkv)) < 0.6

    @jax.jit
    def run():
        def step(cache, t):
            take = lambda x: jax.lax.dynamic_slice_in_dim(jnp.asarray(x), t, 1, axis=1)  # noqa: E731
            cache = pruned_cache.append(cache, {"k": take(k), "v": take(v)}, t, score=jnp.asarray(scores)[:, t],
                                        admit=jnp.asarray(admits)[:, t])
            o = ops.softmax_decode(take(q), cache["k"], cache["v"], cache["pos"] >= 0, impl="xla")
            return cache, (o[:, 0], cache["evicted"])

        cache = pruned_cache.init(B, Hkv, {"k": D, "v": D}, jnp.float32, ring=ring, capacity=capacity)
        return jax.lax.scan(step, cache, jnp.arange(T))[1]

    o_TBHD, evicted_TBH = jax.device_get(run())
    total_evicted = 0
    for b in range(B):
        held = [simulate(scores[b, :, h], admits[b, :, h], ring=ring, capacity=capacity) for h in range(Hkv)]
        total_evicted += sum(e for _, e in held)
        for h in range(Hkv):
            assert evicted_TBH[-1, b, h] == held[h][1]
        for t in range(T):
            visible = np.array([[s in held[h][0][t] for h in range(Hkv)] for s in range(T)])
            want = _dense_attention(q[b, t].astype(np.float64), k[b].astype(np.float64), v[b].astype(np.float64),
                                    visible)
            assert_close(o_TBHD[t, b], want, rel=1e-5, name=f"b{b} t{t}")
    assert (total_evicted > 0) == (capacity == 2)


def test_decode_refuses_malformed_lengths():
    q, kv = jnp.zeros((2, 1, 4, 8)), jnp.zeros((2, 5, 2, 8))
    with pytest.raises(ValueError, match=r"lengths must be \(2, 2\)"):
        ops.softmax_decode(q, kv, kv, lengths=jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="lengths must be integers"):
        ops.softmax_decode(q, kv, kv, lengths=jnp.zeros((2, 2)))
