"""Cache policies (attention/cache_policies.py) at equal budget: each policy's selection rule on small hand-checked
cases, decode through the real cache against dense attention under the held set a plain-Python simulation of the
rule gives (every policy), the softmax mixer under a policy, and the errors for what cannot run."""
from __future__ import annotations

from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention import cache_policies, ops
from attention.cache_policies import CachePolicy, CachePolicyError
from attention.softmax import SoftmaxAttention, SoftmaxConfig
from attention.spkv import SPKVConfig
from tests.attention.mixers import context, decode_all, forward
from tests.numerics import assert_close

THRESHOLD = 0.0  # the logit of tau = 0.5


def _run(policy, q, k, v, utility=None, *, max_len=None):
    """Decode T tokens through a cache under `policy`: per step the output [T,B,Hq,D], the positions held
    [T,B,slots,Hkv] and the eviction counts [T,B,Hkv]."""
    B, T, Hkv, D = k.shape

    @jax.jit
    def run():
        def step(cache, t):
            take = lambda x: jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1)  # noqa: E731
            gate = {} if utility is None else dict(utility=utility[:, t], threshold=THRESHOLD)
            cache = cache_policies.append(cache, {"k": take(k), "v": take(v)}, t, layer_idx=3, **gate)
            lengths = jnp.minimum(t + 1, cache["admit"].shape[1]) + cache["stored"]
            o = ops.softmax_decode(take(q), cache["k"], cache["v"], lengths=lengths, impl="xla")
            cache = cache["policy"].observe(cache, take(q), cache["k"], lengths, scale=D ** -0.5)
            return cache, (o[:, 0], cache["pos"], cache["evicted"])

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
    """Ring 2, store 3 of 12 tokens: 10 older keys compete with uniform random scores, drawn independently for
    each of 60 sequences x 5 KV heads, so each older key is held at the end of 300 samples with probability
    3/10; a seed gives the same samples every time."""
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
                      (lambda: CachePolicy("sink-window", budget=4).slots(1000), "give a budget above 4")):
        with pytest.raises(CachePolicyError, match=says):
            bad()


# ----------------------------------------------------------------------------------------------
# every policy: decode through the cache = attention under the held set of the rules


def simulate(name, q, k, v, *, ring, capacity, utility=None, tags=None):
    """Plain Python/numpy, one sequence: per step the output [Hq, D] and the held positions per KV head. Keys
    leaving the ring enter a store of `capacity` if admitted (spkv: utility >= 0); a full store drops the lowest
    score, newcomer included (spkv: utility; sink-window: -position; random: `tags`; h2o: the attention drawn
    so far, summed over the KV head's query heads)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    store = [[] for _ in range(Hkv)]
    mass = [defaultdict(float) for _ in range(Hkv)]
    outs, helds = [], []

    def score(h, p):
        return {"spkv": lambda: utility[p, h], "sink-window": lambda: -p, "random": lambda: tags[p, h],
                "h2o": lambda: mass[h][p]}[name]()

    for t in range(T):
        leaving = t - ring
        for h in range(Hkv):
            if leaving >= 0 and (name != "spkv" or utility[leaving, h] >= 0):
                if len(store[h]) < capacity:
                    store[h].append(leaving)
                elif capacity:
                    weakest = min(range(capacity), key=lambda i: (score(h, store[h][i]), i))
                    if score(h, leaving) > score(h, store[h][weakest]):
                        store[h][weakest] = leaving
        held = [sorted(set(store[h]) | set(range(max(0, t - ring + 1), t + 1))) for h in range(Hkv)]
        out = np.zeros((Hq, v.shape[-1]))
        for hq in range(Hq):
            h = hq // G
            s = np.array([k[p, h] @ q[t, hq] for p in held[h]]) / np.sqrt(D)
            w = np.exp(s - s.max())
            w /= w.sum()
            out[hq] = w @ v[held[h], h]
            for p, wp in zip(held[h], w):
                mass[h][p] += wp
        outs.append(out)
        helds.append([set(x) for x in held])
    return np.stack(outs), helds


@pytest.mark.parametrize("name", ["spkv", "sink-window", "h2o", "random"])
def test_decode_is_attention_under_the_held_set(name):
    """Random q, k, v (GQA: 4 query heads on 2 KV heads, 2 sequences), budget 6 of 16 tokens, window 3: every
    step of decode through the cache equals dense attention over the keys the simulated rule holds, and the held
    sets are the same."""
    rng = np.random.default_rng(1)
    B, T, Hq, Hkv, D, ring = 2, 16, 4, 2, 8, 3
    q = rng.standard_normal((B, T, Hq, D)).astype(np.float32)
    k = rng.standard_normal((B, T, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((B, T, Hkv, D)).astype(np.float32)
    utility = rng.standard_normal((B, T, Hkv)).astype(np.float32) + 0.5 if name == "spkv" else None
    policy = CachePolicy(name, budget=6, window=ring, seed=5)
    o, pos, _ = _run(policy, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                     None if utility is None else jnp.asarray(utility))
    tags = None
    if name == "random":
        tags = np.stack([np.asarray(policy.token(position=t, batch=B, n_kv_heads=Hkv, layer_idx=3)[0])
                         for t in range(T)], axis=1)
    for b in range(B):
        want, helds = simulate(name, q[b].astype(np.float64), k[b].astype(np.float64), v[b].astype(np.float64),
                               ring=ring, capacity=3, utility=None if utility is None else utility[b],
                               tags=None if tags is None else tags[b])
        for t in range(T):
            assert [_held(pos[t, b], h) for h in range(Hkv)] == helds[t], (b, t)
        assert_close(o[:, b], want, rel=1e-5, name=f"{name} b{b}")
    assert max(len(h) for h in helds[-1]) == 6


# ----------------------------------------------------------------------------------------------
# the softmax mixer under a policy


def _mixer(spkv=None, **kw):
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


@pytest.mark.parametrize("name", ["sink-window", "h2o", "random"])
def test_a_budget_that_holds_everything_is_the_full_forward(name):
    """Budget = the sequence: no policy drops anything, so the mixer decodes as its forward; a small budget holds
    exactly the budget per head."""
    m = _mixer()
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 12, 32)), jnp.float32)
    y, cache = _decode_with(m, x, CachePolicy(name, budget=12))
    assert_close(y, forward(m, x, None), rel=1e-5, name=name)
    assert (np.asarray(cache["evicted"]) == 0).all()
    y, cache = _decode_with(m, x, CachePolicy(name, budget=6))
    assert cache["pos"].shape[1] == 6 and (np.asarray(cache["pos"]) >= 0).all()
    assert (np.asarray(cache["evicted"]) == 12 - 6).all()
    assert float(jnp.max(jnp.abs(y - forward(m, x, None)))) > 1e-4, "dropped keys must change some output"


def test_spkv_policy_without_a_budget_is_the_layers_own_cache():
    m = _mixer(spkv=SPKVConfig(window=4, init_bias=0.0))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 12, 32)), jnp.float32)
    y, cache = _decode_with(m, x, CachePolicy("spkv"))
    assert_close(y, decode_all(m, x), rel=1e-6, name="spkv policy")
    assert cache["policy"] == CachePolicy("spkv")


def test_layers_a_policy_cannot_run_on():
    with pytest.raises(CachePolicyError, match="needs SP-KV layers"):
        _mixer().init_cache(1, 16, policy=CachePolicy("spkv", budget=8))
    with pytest.raises(CachePolicyError, match="sliding-window layer already holds only its window"):
        _mixer(sliding_window=8).init_cache(1, 16, policy=CachePolicy("h2o", budget=8))
