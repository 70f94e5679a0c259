"""The pruned KV cache (attention/pruned_cache.py): rings and a paged store shared by the batch's (sequence, KV head)
pairs, appends at each pair's own length taking pages as they fill, eviction only when the pool is exhausted (the
pair's lowest score goes, counted), the waste of ragged densities, capacities, and decode through it (the dense
cache's ring and the store's pages, every implementation) against dense attention under the mask of the keys
the plain-Python model of the same rules (tests/attention/pool_model.py) says are held."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import ops, pruned_cache
from tests.attention.pool_model import PoolModel
from tests.numerics import assert_close


def _fill(scores_BTH, admits_BTH, *, ring, capacity, page, entries_BTHD=None):
    """Append T tokens one by one (older = T - ring keys can leave a ring); returns the cache after each step (a
    pytree with a leading T axis). Entries default to each token's position, so a slot shows what it holds."""
    B, T, H = scores_BTH.shape
    entries = entries_BTHD or {"k": jnp.broadcast_to(jnp.arange(T, dtype=jnp.float32)[None, :, None, None],
                                                     (B, T, H, 1))}
    dims = {n: e.shape[-1] for n, e in entries.items()}

    def step(cache, t):
        new = pruned_cache.append(cache, {n: jax.lax.dynamic_slice_in_dim(e, t, 1, axis=1) for n, e in entries.items()},
                                  t, score=scores_BTH[:, t], admit=admits_BTH[:, t])
        return new, new

    cache = pruned_cache.init(B, H, dims, jnp.float32, ring=ring, capacity=capacity, older=T - ring, page=page)
    return jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(T))[1])(cache)


def _at(steps, t):
    return jax.tree.map(lambda x: x[t], steps)


def _held(cache, t, b, h) -> set[int]:
    """The positions pair (b, h) holds: the ring's slots and its store's, read through its page table."""
    _, pos, held = pruned_cache.dense_view(cache, t)
    pos, held = np.asarray(pos)[b, :, h], np.asarray(held)[b, :, h]
    return set(pos[held].tolist())


def _check_against_model(steps, model_steps, B, H):
    for t, model in enumerate(model_steps):
        cache = _at(steps, t)
        for b in range(B):
            for h in range(H):
                assert _held(cache, t, b, h) == model["held"][b, h], (t, b, h)
        np.testing.assert_array_equal(cache["evicted"], model["evicted"], err_msg=f"step {t}")


def _run_model(scores, admits, *, ring, capacity, page):
    """The model's held sets and eviction counts after each step."""
    B, T, H = scores.shape
    model = PoolModel(B, H, ring=ring, capacity=capacity, older=T - ring, page=page)
    out = []
    for t in range(T):
        model.step(t, lambda pair, p: bool(admits[pair[0], p, pair[1]]), lambda pair, p: scores[pair[0], p, pair[1]])
        out.append({"held": {pair: model.held(pair, t) for pair in model.pairs},
                    "evicted": np.array([[model.evicted[(b, h)] for h in range(H)] for b in range(B)])})
    return out, model


def test_a_dense_pair_takes_pages_sparse_pairs_leave_and_evicts_only_when_the_pool_is_empty():
    """Ring 2, capacity 2 keys per pair in pages of 2: a pool of 4 pages for 4 pairs, 10 tokens.

    Pair (0,0) admits tokens 0-7 with scores 5, 1, 4, 9, 3, 2, 0, 8; (0,1) admits 0; (1,0) admits 1, 2, 3 with
    scores 6, 2, 7; (1,1) nothing. Token p leaves its ring at step p + 2. Step 2: (0,0) and (0,1) take pages 0
    and 1; step 3: (1,0) takes page 2; step 4: (0,0) takes page 3, the last. Step 5: (1,0)'s pages are full and
    none is free, so its weakest key, 2, gives its slot to 3 (7 > 2). (0,0) stores 3, then evicts: 4 (score 3)
    replaces 1 (score 1), 5 and 6 lose to 4 and are dropped, 7 (score 8) replaces 4. At the end (0,0) holds 4
    keys, twice its share, with 4 evictions; a store of 2 per pair would have held 2 and dropped 6."""
    T, B, H = 10, 2, 2
    scores = np.zeros((B, T, H), np.float32)
    admits = np.zeros((B, T, H), bool)
    scores[0, :8, 0] = [5, 1, 4, 9, 3, 2, 0, 8]
    admits[0, :8, 0] = True
    admits[0, 0, 1] = True
    scores[1, 1:4, 0] = [6, 2, 7]
    admits[1, 1:4, 0] = True
    steps = _fill(jnp.asarray(scores), jnp.asarray(admits), ring=2, capacity=2, page=2)
    last = _at(steps, T - 1)
    assert last["pages"]["k"].shape == (4, 2, 1) and last["k"].shape == (B, 2, H, 1)
    assert [[_held(last, T - 1, b, h) for h in range(H)] for b in range(B)] == \
        [[{0, 2, 3, 7, 8, 9}, {0, 8, 9}], [{1, 3, 8, 9}, {8, 9}]]
    np.testing.assert_array_equal(last["stored"], [[4, 1], [2, 0]])
    np.testing.assert_array_equal(last["evicted"], [[4, 0], [1, 0]])
    np.testing.assert_array_equal(last["table"], [[[0, 3, -1, -1], [1, -1, -1, -1]], [[2, -1, -1, -1], [-1] * 4]])
    np.testing.assert_array_equal(last["owner"], [0, 1, 2, 0])
    assert int(last["used"]) == 4
    np.testing.assert_array_equal(pruned_cache.waste(last), [[0, 1], [0, 0]])
    np.testing.assert_array_equal(pruned_cache.occupancy(last), [[6, 3], [4, 2]])
    # The entries moved with their positions: every held pool slot holds its own position.
    pos, k = np.asarray(last["page_pos"]), np.asarray(last["pages"]["k"])[..., 0]
    np.testing.assert_array_equal(k[pos >= 0], pos[pos >= 0])
    model_steps, _ = _run_model(scores, admits, ring=2, capacity=2, page=2)
    _check_against_model(steps, model_steps, B, H)


def test_ragged_densities_in_one_batch_waste_at_most_a_page_per_pair():
    """6 pairs keeping 90%, 60%, 30%, 10%, 0% and 50% of 60 older keys, in pages of 4: a pool of the mean kept
    count per pair holds every kept key (no eviction, although the densest pair keeps 3x the mean), each pair
    owns exactly the pages its keys fill (unused: the rest of its last page, under a page), and a store of that
    capacity per pair would have evicted. Step by step the cache follows the model."""
    rng = np.random.default_rng(0)
    B, H, T, ring, page = 3, 2, 64, 4, 4
    density = np.array([[0.9, 0.6], [0.3, 0.1], [0.0, 0.5]])
    admits = rng.random((B, T, H)) < density[:, None, :]
    scores = rng.standard_normal((B, T, H)).astype(np.float32)
    kept = admits[:, :T - ring].sum(axis=1)
    capacity = -(-int(kept.sum()) // kept.size)
    assert kept.max() > 2 * capacity
    steps = _fill(jnp.asarray(scores), jnp.asarray(admits), ring=ring, capacity=capacity, page=page)
    last = _at(steps, T - 1)
    np.testing.assert_array_equal(last["evicted"], 0)
    np.testing.assert_array_equal(last["stored"], kept)
    waste = np.asarray(pruned_cache.waste(last))
    np.testing.assert_array_equal(waste, -(-kept // page) * page - kept)
    assert (waste < page).all()
    owned = np.bincount(np.asarray(last["owner"])[np.asarray(last["owner"]) >= 0], minlength=B * H)
    np.testing.assert_array_equal(owned.reshape(B, H), -(-kept // page))
    ring_slots, pool_slots = pruned_cache.slots_per_pair(last)
    assert ring_slots == ring and pool_slots == -(-capacity // page) * page
    model_steps, model = _run_model(scores, admits, ring=ring, capacity=capacity, page=page)
    _check_against_model(steps, model_steps, B, H)
    assert [model.waste(p) for p in model.pairs] == waste.reshape(-1).tolist()


def test_zero_capacity_holds_the_window_and_counts_what_it_drops():
    T = 7
    admits = jnp.ones((1, T, 1), bool)
    last = _at(_fill(jnp.zeros((1, T, 1)), admits, ring=3, capacity=0, page=4), T - 1)
    assert _held(last, T - 1, 0, 0) == {4, 5, 6} and int(last["evicted"][0, 0]) == T - 3
    assert last["pos"].shape == (1, 3, 1) and last["pages"]["k"].shape[0] == 0


def test_store_slots_and_pages():
    # 100 tokens, window 20: 80 keys can leave the window.
    assert pruned_cache.store_slots(None, 20, 100) == 80
    assert pruned_cache.store_slots(0.25, 20, 100) == 20
    assert pruned_cache.store_slots(0.01, 20, 100) == 1  # rounded up
    assert pruned_cache.store_slots(12, 20, 100) == 12
    assert pruned_cache.store_slots(500, 20, 100) == 80  # never more than can leave the window
    assert pruned_cache.store_slots(None, 20, 10) == 0 and pruned_cache.ring_slots(20, 10) == 10
    assert [pruned_cache.page_size(s) for s in (0, 1, 3, 24, 64, 3598)] == [1, 1, 3, 24, 64, 64]
    # The pool: each pair's share rounded up to whole pages; a table row as long as the older keys' pages.
    cache = pruned_cache.init(2, 3, {"k": 4}, jnp.float32, ring=8, capacity=10, older=40, page=4)
    assert cache["pages"]["k"].shape == (2 * 3 * 3, 4, 4) and cache["table"].shape == (2, 3, 10)


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


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
@pytest.mark.parametrize("capacity", [11, 2])
def test_decode_through_the_cache_is_attention_over_the_held_keys(capacity, impl):
    """Random q, k, v and scores; the read is ops.softmax_decode over the rings up to their lengths and the
    store's pages. At capacity 11 (every older key) nothing is evicted; at 2 the pool (4 pairs x one page of 2)
    runs out. Every step equals dense attention under the held set of the model, per sequence and KV head (GQA:
    4 query heads on 2 KV heads)."""
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
            o = ops.softmax_decode(take(q), cache["k"], cache["v"], lengths=pruned_cache.ring_lengths(cache, t),
                                   pages=pruned_cache.key_pages(cache), impl=impl)
            return cache, (o[:, 0], cache["evicted"])

        cache = pruned_cache.init(B, Hkv, {"k": D, "v": D}, jnp.float32, ring=ring, capacity=capacity,
                                  older=T - ring, page=2)
        return jax.lax.scan(step, cache, jnp.arange(T))[1]

    o_TBHD, evicted_TBH = jax.device_get(run())
    model_steps, model = _run_model(scores, admits, ring=ring, capacity=capacity, page=2)
    for t, step in enumerate(model_steps):
        np.testing.assert_array_equal(evicted_TBH[t], step["evicted"])
        for b in range(B):
            visible = np.array([[s in step["held"][(b, h)] for h in range(Hkv)] for s in range(T)])
            want = _dense_attention(q[b, t].astype(np.float64), k[b].astype(np.float64), v[b].astype(np.float64),
                                    visible)
            assert_close(o_TBHD[t, b], want, rel=1e-5, name=f"b{b} t{t}")
    assert (sum(model.evicted.values()) > 0) == (capacity == 2)


def test_decode_refuses_malformed_lengths():
    q, kv = jnp.zeros((2, 1, 4, 8)), jnp.zeros((2, 5, 2, 8))
    with pytest.raises(ValueError, match=r"lengths must be \(2, 2\)"):
        ops.softmax_decode(q, kv, kv, lengths=jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="lengths must be integers"):
        ops.softmax_decode(q, kv, kv, lengths=jnp.zeros((2, 2)))
