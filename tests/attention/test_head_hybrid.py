"""Per-head local/global softmax layers (`local_heads`): the listed KV heads (and the query heads that read them)
attend within `sliding_window`, the others to the whole context. Each head's output equals that of the same weights
in an all-global or an all-local layer; decode equals the forward; the cache holds what the analytic counts say;
bad settings are refused."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention.base import MixerContext, Stat
from attention.cache_policies import CachePolicy, CachePolicyError
from attention.softmax import SoftmaxAttention, SoftmaxConfig, head_groups
from tests.attention.mixers import decode_all, params_of, set_params
from tests.numerics import assert_close

E, B, T, W = 32, 2, 13, 4


def _ctx(impl="xla"):
    return MixerContext(d_model=E, n_layers=2, layer_idx=0, seq_len=16, pos="rope", rope_theta=100.0, bias=False,
                        norm_eps=1e-5, init_std=0.2, out_std=0.2, dtype=jnp.float32, impl=impl)


def _x(seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, E)), jnp.float32)


POSITIONS = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


@nnx.jit
def _forward(m, x):
    return m(x, positions=POSITIONS)


def _with_identity_output(m: SoftmaxAttention) -> SoftmaxAttention:
    """o_proj = identity (n_heads * head_dim = d_model), so the output's channels are the heads' outputs."""
    p = jax.tree.map(np.array, params_of(m))
    p["o_proj"]["kernel"][:] = np.eye(E)
    set_params(m, p)
    return m


@pytest.mark.parametrize("cfg, local", [(dict(n_heads=8, n_kv_heads=4), [3, 1]),
                                        (dict(n_heads=8), [0, 5, 6]),
                                        (dict(n_heads=8, share="kv", qk_norm=True), [2])])
def test_each_head_attends_as_its_group(cfg, local):
    """Query head h's output (channels h*hd..) is the all-local layer's where h reads a local KV head, the
    all-global layer's elsewhere: same weights, only the window differs."""
    base = SoftmaxConfig(**cfg)
    hybrid = _with_identity_output(SoftmaxAttention(base.model_copy(update={"sliding_window": W, "local_heads": local}),
                                                    _ctx(), rngs=nnx.Rngs(0)))
    glob = SoftmaxAttention(base, _ctx(), rngs=nnx.Rngs(1))
    loc = SoftmaxAttention(base.model_copy(update={"sliding_window": W}), _ctx(), rngs=nnx.Rngs(2))
    for m in (glob, loc):
        set_params(m, params_of(hybrid))
    x = _x()
    y, y_glob, y_loc = (np.asarray(_forward(m, x)) for m in (hybrid, glob, loc))
    hd, group = E // base.n_heads, base.n_heads // base.kv_heads()
    for h in range(base.n_heads):
        want = y_loc if h // group in local else y_glob
        np.testing.assert_allclose(y[..., h * hd:(h + 1) * hd], want[..., h * hd:(h + 1) * hd], rtol=1e-5, atol=1e-6,
                                   err_msg=f"query head {h}")
    # The window matters at this length, so the check above can tell the groups apart.
    assert np.abs(y_loc - y_glob).max() > 1e-3


@pytest.mark.parametrize("cfg", [dict(n_heads=8, n_kv_heads=4, local_heads=[0, 3]),
                                 dict(n_heads=8, local_heads=[7]),
                                 dict(n_heads=8, n_kv_heads=2, share="kv", qk_norm=True, local_heads=[1]),
                                 dict(n_heads=8, n_kv_heads=4, value_shift=True, local_heads=[2])],
                         ids=["gqa", "mha", "kv_shared_rope", "value_shift"])
def test_decode_reproduces_forward(cfg):
    """T = 13 > 3 windows of 4: the local group's ring wraps while the global group's cache grows."""
    m = SoftmaxAttention(SoftmaxConfig(sliding_window=W, **cfg), _ctx(), rngs=nnx.Rngs(0))
    full = _forward(m, _x())
    nnx.pop(m, Stat)
    assert_close(decode_all(m, _x()), full, rel=1e-5, name=str(cfg))


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_the_cache_holds_what_the_analytic_counts_say():
    """Global KV heads grow by a key and a value per token; local ones hold a ring of W; FLOPs split the same way."""
    cfg = SoftmaxConfig(n_heads=8, n_kv_heads=4, sliding_window=W, local_heads=[1, 2, 3])
    m = SoftmaxAttention(cfg, _ctx(), rngs=nnx.Rngs(0))
    hd = E // 8
    assert m.cache_bytes_per_token() == 2 * 1 * hd * 4 and m.state_bytes() == W * 2 * 3 * hd * 4
    for n in (16, 40):
        assert _bytes(m.init_cache(B, n)) == B * (n * m.cache_bytes_per_token() + m.state_bytes())
    glob = SoftmaxAttention(cfg.model_copy(update={"sliding_window": None, "local_heads": None}), _ctx(),
                            rngs=nnx.Rngs(0))
    loc = SoftmaxAttention(cfg.model_copy(update={"local_heads": None}), _ctx(), rngs=nnx.Rngs(0))
    # 2 of 8 query heads global, 6 local: the attention FLOPs mix in that proportion, the projections are the same.
    n = 64
    assert m.flops_per_token(n) == pytest.approx((2 * glob.flops_per_token(n) + 6 * loc.flops_per_token(n)) / 8)
    assert [g.kv for g in head_groups(cfg)] == [(0,), (1, 2, 3)]
    assert [g.q for g in head_groups(cfg)] == [(0, 1), (2, 3, 4, 5, 6, 7)]


def test_cache_policies_are_refused():
    m = SoftmaxAttention(SoftmaxConfig(n_heads=8, sliding_window=W, local_heads=[0]), _ctx(), rngs=nnx.Rngs(0))
    with pytest.raises(CachePolicyError, match="with local_heads, its local heads do"):
        m.init_cache(B, T, policy=CachePolicy("h2o", budget=8))


@pytest.mark.parametrize("extra, match", [(dict(local_heads=[0]), "sliding_window, which is not set"),
                                          (dict(sliding_window=W, local_heads=[4]), "in [0, 4)"),
                                          (dict(sliding_window=W, local_heads=[1, 1]), "distinct"),
                                          (dict(sliding_window=W, local_heads=[]), "at least one")])
def test_bad_local_heads_are_refused(extra, match):
    errs = SoftmaxConfig(n_heads=8, n_kv_heads=4, **extra).check(_ctx())
    assert any(e.startswith("local_heads:") and match in e for e in errs), errs
