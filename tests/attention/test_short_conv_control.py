"""The softmax mixer's short-conv control (`short_conv`): KDA's depthwise causal conv and SiLU on q, k and v, so
softmax attention gets the same local context from step 0. Decode equals the forward, packed documents stay
apart, the analytics count the conv, and combinations it does not support are refused."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention.base import MixerContext
from attention.softmax import SoftmaxAttention, SoftmaxConfig
from attention.spkv import SPKVConfig
from tests.attention.mixers import decode_all
from tests.numerics import assert_close

E, B, T, W = 32, 2, 12, 4


def _ctx(impl="reference"):
    return MixerContext(d_model=E, n_layers=2, layer_idx=0, seq_len=16, pos="rope", rope_theta=100.0, bias=False,
                        norm_eps=1e-5, init_std=0.2, out_std=0.2, dtype=jnp.float32, impl=impl)


def _mixer(**cfg):
    return SoftmaxAttention(SoftmaxConfig(n_heads=4, n_kv_heads=2, short_conv=W, **cfg), _ctx(), rngs=nnx.Rngs(0))


def _x(seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, E)), jnp.float32)


@nnx.jit
def _forward(m, x, positions, segment_ids):
    return m(x, positions=positions, segment_ids=segment_ids)


POSITIONS = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def test_decode_reproduces_forward():
    m = _mixer()
    assert_close(decode_all(m, _x()), _forward(m, _x(), POSITIONS, None), rel=1e-5, name="decode")


def test_documents_do_not_leak_through_the_conv():
    """The second document's outputs do not change when the first document's tokens do."""
    m = _mixer()
    seg = jnp.asarray(np.where(np.arange(T) < 5, 0, 1)[None].repeat(B, 0), jnp.int32)
    pos = jnp.asarray(np.where(np.arange(T) < 5, np.arange(T), np.arange(T) - 5)[None].repeat(B, 0), jnp.int32)
    x, x2 = _x(0), _x(0).at[:, :5].set(_x(1)[:, :5])
    y, y2 = _forward(m, x, pos, seg), _forward(m, x2, pos, seg)
    np.testing.assert_allclose(np.asarray(y[:, 5:]), np.asarray(y2[:, 5:]), rtol=0, atol=1e-6)
    assert np.abs(np.asarray(y[:, :5] - y2[:, :5])).max() > 1e-3, "the first document must change"


def test_conv_changes_the_output_and_counts_in_the_analytics():
    plain = SoftmaxAttention(SoftmaxConfig(n_heads=4, n_kv_heads=2), _ctx(), rngs=nnx.Rngs(0))
    conv = _mixer()
    params = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    width = 4 * 8 + 2 * 2 * 8  # q, k, v projection widths
    assert params(conv) - params(plain) == W * width
    assert conv.flops_per_token(T) - plain.flops_per_token(T) == 2 * W * width
    assert conv.state_bytes() == (W - 1) * width * 4 and plain.state_bytes() == 0
    assert np.abs(np.asarray(_forward(conv, _x(), POSITIONS, None) - _forward(plain, _x(), POSITIONS, None))).max() > 1e-3


@pytest.mark.parametrize("extra, match", [(dict(share="kv"), "share: kv"),
                                          (dict(spkv=SPKVConfig(window=4)), "spkv: set")])
def test_unsupported_combinations_are_refused(extra, match):
    errs = SoftmaxConfig(n_heads=4, short_conv=W, **extra).check(_ctx())
    assert any("short_conv" in e and match in e for e in errs), errs
