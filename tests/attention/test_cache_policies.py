"""Cache policies (attention/cache_policies.py) at equal budget: each policy's selection rule on small hand-checked
cases, decode through the real cache (rings and a paged store shared by the batch) against dense attention under
the held set the plain-Python model of the cache's rules gives with the policy's scores (every policy), the softmax
and CCA mixers under a policy, and the errors for what cannot run."""
from __future__ import annotations

from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention import cache_policies, ops, pruned_cache
from attention.cache_policies import CachePolicy, CachePolicyError
from attention.cca import CCAConfig, CCAttention
from attention.softmax import SoftmaxAttention, SoftmaxConfig
from attention.spkv import SPKVConfig
from tests.attention.mixers import context, decode_all, forward
from tests.attention.pool_model import PoolModel
from tests.numerics import assert_close

THRESHOLD = 0.0  # the logit of tau = 0.5


def _run(policy, q, k, v, utility=None, *, max_len=None):
    """Decode T tokens through a cache under `policy`: per step the output [T,B,Hq,D], the positions each pair
    holds [T,B,slots,Hkv] (-1: a slot it does not hold) and the eviction counts [T,B,Hkv]."""
    B, T, Hkv, D = k.shape

    @jax.jit
    def run():
        def step(cache, t):
            take = lambda x: jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1)  # noqa: E731
            gate = {} if utility is None else dict(utility=utility[:, t], threshold=THRESHOLD)
            cache = cache_policies.append(cache, {"k": take(k), "v": take(v)}, t, layer_idx=3, **gate)
            o = ops.softmax_decode(take(q), cache["k"], cache["v"], lengths=pruned_cache.ring_lengths(cache, t),
                                   pages=pruned_cache.key_pages(cache), impl="xla")
            cache = cache["policy"].observe(cache, take(q), t, scale=D ** -0.5)
            _, pos, held = pruned_cache.dense_view(cache, t)
            return cache, (o[:, 0], jnp.where(held, pos, -1), cache["evicted"])

        spkv = None if utility is None else SPKVConfig(window=policy.window)
        cache = cache_policies.init(policy, B, Hkv, {"k": D, "v": D}, jnp.float32, max_len or T, spkv=spkv)
        return jax.lax.scan(step, cache, jnp.arange(T))[1]

    return jax.device_get(run())


def _held(pos_SH, h) -> set[int]:
    return {int(p) for p in pos_SH[:, h] if p >= 0}


# ----------------------------------------------------------------------------------------------
# selection rules, hand-checked


def test_sink_window_keeps_the_first_tokens_and_the_recent_window():
    """Budget 6 = window 2 + 4 sinks: after 10 tokens, tokens 0-3 and 8-9; the 4 tokens between were dropped."""
    T = 10
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, T, 1, 4)), jnp.float32)
    policy = CachePolicy("sink-window", budget=6)
    assert policy.slots(T) == (2, 4)
    _, pos, evicted = _run(policy, x, x, x)
    assert _held(pos[-1, 0], 0) == {0, 1, 2, 3, 8, 9} and evicted[-1, 0, 0] == 4
    assert _held(pos[5, 0], 0) == {0, 1, 2, 3, 4, 5}  # nothing dropped yet: the sinks fill first


def test_h2o_keeps_the_keys_that_drew_the_attention():
    """One head, d 1, q = 1: keys 1 and 3 are 10 and every other key 0, so keys 1 and 3 take nearly all the
    attention while held, and key 0 took all of it at the first step, alone. Ring 1, store 3: 0, 1 and 2 fill
    the store; 3 (half the attention at step 3) then evicts 2 (almost none), and 4, 5, 6 lose to all three. Held
    at the end: 0, 1, 3 and the newest, 7."""
    T = 8
    q = jnp.ones((1, T, 1, 1))
    k = jnp.zeros((1, T, 1, 1)).at[0, jnp.asarray([1, 3])].set(10.0)
    _, pos, evicted = _run(CachePolicy("h2o", budget=4, window=1), q, k, k)
    assert _held(pos[-1, 0], 0) == {0, 1, 3, 7} and evicted[-1, 0, 0] == 4
    assert _held(pos[3, 0], 0) == {0, 1, 2, 3} and _held(pos[4, 0], 0) == {0, 1, 3, 4}


def test_random_keeps_a_uniform_sample_of_the_older_keys():
    """Ring 2, store 3 of 12 tokens (one page of 3 per pair): 10 older keys compete with uniform random scores,
    drawn independently for each of 60 sequences x 5 KV heads, so each older key is held at the end of 300
    samples with probability 3/10; a seed gives the same samples every time."""
    T, B, H = 12, 60, 5
    x = jnp.zeros((B, T, H, 2))
    pos = _run(CachePolicy("random", budget=5, window=2, seed=7), x, x, x)[1][-1]
    counts = np.zeros(T)
    for b in range(B):
        for h in range(H):
            held = _held(pos[b], h)
            assert {10, 11} <= held and len(held) == 5
            counts[sorted(held - {10, 11})] += 1
    share = counts[:10] / (B * H)
    assert np.all(np.abs(share - 0.3) < 0.1), share  # binomial sd 0.026: 0.1 is almost 4 sd
    np.testing.assert_array_equal(_run(CachePolicy("random", budget=5, window=2, seed=7), x, x, x)[1][-1], pos)
    assert not np.array_equal(_run(CachePolicy("random", budget=5, window=2, seed=8), x, x, x)[1][-1], pos)


def test_slots_and_refusals():
    spkv = SPKVConfig(window=64, cache={"capacity": 0.25})
    assert CachePolicy("spkv").slots(1000, spkv) == (64, 234)  # the configured capacity beside the window
    assert CachePolicy("spkv", budget=200).slots(1000, spkv) == (64, 136)
    assert CachePolicy("h2o", budget=200).slots(1000, spkv) == (64, 136)  # the SP-KV layer's window
    assert CachePolicy("h2o", budget=200).slots(1000) == (100, 100)  # half and half without one
    assert CachePolicy("random", budget=200, window=50).slots(1000) == (50, 150)
    assert CachePolicy("sink-window", budget=200).slots(1000, spkv) == (196, 4)
    assert CachePolicy("h2o", budget=200).slots(120) == (100, 20)  # never more than can leave the window
    for bad, says in ((lambda: CachePolicy("lru", budget=3), "unknown cache policy 'lru'"),
                      (lambda: CachePolicy("h2o"), "cache policy h2o needs a budget"),
                      (lambda: CachePolicy("h2o", budget=0), "at least 1; got 0"),
                      (lambda: CachePolicy("spkv", budget=32).slots(1000, spkv), "smaller than the window of 64"),
                      (lambda: CachePolicy("spkv", budget=100).slots(1000), "needs SP-KV layers"),
                      (lambda: CachePolicy("sink-window", budget=4).slots(1000), "give a budget above 4"),
                      (lambda: CachePolicy("h2o", budget=8, page=0), "a cache page holds at least 1 key")):
        with pytest.raises(CachePolicyError, match=says):
            bad()


# ----------------------------------------------------------------------------------------------
# every policy: decode through the cache = attention under the held set of the rules


def simulate(name, q, k, v, *, ring, capacity, page, utility=None, tags=None):
    """Plain Python/numpy, a batch: per step the outputs [B, Hq, D] and the held positions per sequence and KV
    head, the cache's rules (`PoolModel`) with the policy's admission (spkv: utility >= 0, else every key) and
    scores (spkv: utility; sink-window: -position; random: `tags`; h2o: the attention drawn so far, summed over
    the KV head's query heads)."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    model = PoolModel(B, Hkv, ring=ring, capacity=capacity, older=T - ring, page=page)
    mass = defaultdict(float)

    def score(pair, p):
        (b, h) = pair
        return {"spkv": lambda: utility[b, p, h], "sink-window": lambda: -p, "random": lambda: tags[b, p, h],
                "h2o": lambda: mass[b, h, p]}[name]()

    outs, helds = [], []
    for t in range(T):
        model.step(t, lambda pair, p: name != "spkv" or utility[pair[0], p, pair[1]] >= 0, score)
        held = [[sorted(model.held((b, h), t)) for h in range(Hkv)] for b in range(B)]
        out = np.zeros((B, Hq, v.shape[-1]))
        for b in range(B):
            for hq in range(Hq):
                h = hq // G
                s = np.array([k[b, p, h] @ q[b, t, hq] for p in held[b][h]]) / np.sqrt(D)
                w = np.exp(s - s.max())
                w /= w.sum()
                out[b, hq] = w @ v[b, held[b][h], h]
                for p, wp in zip(held[b][h], w):
                    mass[b, h, p] += wp
        outs.append(out)
        helds.append([[set(x) for x in row] for row in held])
    return np.stack(outs), helds, model


@pytest.mark.parametrize("name", ["spkv", "sink-window", "h2o", "random"])
def test_decode_is_attention_under_the_held_set(name):
    """Random q, k, v (GQA: 4 query heads on 2 KV heads, 2 sequences), budget 6 of 16 tokens, window 3: a store of
    3 keys per pair on average, here in pages of 2 (4 pairs: a pool of 8 pages, 16 slots). Every step of decode
    through the cache equals dense attention over the keys the model holds, the held sets are the same, and the
    pool ends full, each pair holding what its pages took."""
    rng = np.random.default_rng(1)
    B, T, Hq, Hkv, D, ring = 2, 16, 4, 2, 8, 3
    q = rng.standard_normal((B, T, Hq, D)).astype(np.float32)
    k = rng.standard_normal((B, T, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((B, T, Hkv, D)).astype(np.float32)
    utility = rng.standard_normal((B, T, Hkv)).astype(np.float32) + 0.5 if name == "spkv" else None
    policy = CachePolicy(name, budget=6, window=ring, seed=5, page=2)
    o, pos, _ = _run(policy, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                     None if utility is None else jnp.asarray(utility))
    tags = None
    if name == "random":
        tags = np.stack([np.asarray(policy.token(position=t, batch=B, n_kv_heads=Hkv, layer_idx=3)[0])
                         for t in range(T)], axis=1)
    want, helds, model = simulate(name, *(x.astype(np.float64) for x in (q, k, v)), ring=ring, capacity=3,
                                  page=2, utility=utility, tags=tags)
    for t in range(T):
        assert [[_held(pos[t, b], h) for h in range(Hkv)] for b in range(B)] == helds[t], t
    assert_close(o, want, rel=1e-5, name=name)
    assert model.used == model.n_pages == 8 and sum(len(x) for x in model.store.values()) == 16
    assert sum(model.evicted.values()) > 0


# ----------------------------------------------------------------------------------------------
# the softmax and CCA mixers under a policy


def _mixer(spkv=None, kind="softmax", **kw):
    if kind == "cca":
        return CCAttention(CCAConfig(n_heads=4, n_kv_heads=2, head_dim=8, spkv=spkv, **kw),
                           context(32, impl="xla", seq_len=64), rngs=nnx.Rngs(0))
    cfg = SoftmaxConfig(n_heads=4, n_kv_heads=2, spkv=spkv, **kw)
    return SoftmaxAttention(cfg, context(32, impl="xla", seq_len=64), rngs=nnx.Rngs(0))


@nnx.jit(static_argnames="policy")
def _decode_with(m, x, policy):
    def step(cache, xs):
        y, cache = m.decode(xs[0][:, None], cache, xs[1])
        return cache, y[:, 0]

    cache, y = jax.lax.scan(step, m.init_cache(x.shape[0], x.shape[1], policy=policy),
                            (x.swapaxes(0, 1), jnp.arange(x.shape[1])))
    return y.swapaxes(0, 1), cache


@pytest.mark.parametrize("kind", ["softmax", "cca"])
@pytest.mark.parametrize("name", ["sink-window", "h2o", "random"])
def test_a_budget_that_holds_everything_is_the_full_forward(name, kind):
    """Budget = the sequence: no policy drops anything, so the mixer decodes as its forward; a small budget
    allocates and holds exactly the budget per pair (these policies admit every key, so the pairs fill their pages
    alike) and evicts the rest."""
    m = _mixer(kind=kind)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 12, 32)), jnp.float32)
    y, cache = _decode_with(m, x, CachePolicy(name, budget=12))
    assert_close(y, forward(m, x, None), rel=1e-5, name=name)
    assert (np.asarray(cache["evicted"]) == 0).all()
    y, cache = _decode_with(m, x, CachePolicy(name, budget=6))
    ring, pool = pruned_cache.slots_per_pair(cache)
    assert ring + pool == 6 and (np.asarray(pruned_cache.occupancy(cache)) == 6).all()
    assert (np.asarray(cache["evicted"]) == 12 - 6).all()
    assert float(jnp.max(jnp.abs(y - forward(m, x, None)))) > 1e-4, "dropped keys must change some output"


@pytest.mark.parametrize("kind", ["softmax", "cca"])
def test_spkv_policy_without_a_budget_is_the_layers_own_cache(kind):
    m = _mixer(spkv=SPKVConfig(window=4, init_bias=0.0), kind=kind)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 12, 32)), jnp.float32)
    y, cache = _decode_with(m, x, CachePolicy("spkv"))
    assert_close(y, decode_all(m, x), rel=1e-6, name="spkv policy")
    assert cache["policy"] == CachePolicy("spkv")


def test_layers_a_policy_cannot_run_on():
    with pytest.raises(CachePolicyError, match="needs SP-KV layers"):
        _mixer().init_cache(1, 16, policy=CachePolicy("spkv", budget=8))
    with pytest.raises(CachePolicyError, match="sliding-window layer already holds only its window"):
        _mixer(sliding_window=8).init_cache(1, 16, policy=CachePolicy("h2o", budget=8))
