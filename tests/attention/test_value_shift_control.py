"""The softmax mixer's value-shift control (`value_shift`): CCA's value shift (its paper's eq. 10) on plain attention.
Half the value channels come from the previous token, hand-checked on a case with uniform attention; documents reset
it; decode equals the forward (dense, ring, pruned caches; biases; a split inside one head); parameters and FLOPs stay
those of softmax; combinations it does not support are refused."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention.base import MixerContext, Stat
from attention.softmax import SoftmaxAttention, SoftmaxConfig
from attention.spkv import SPKVConfig
from tests.attention.mixers import decode_all, params_of, set_params
from tests.numerics import assert_close

E, B, T = 32, 2, 12


def _ctx(d_model=E, bias=False, pos="rope"):
    return MixerContext(d_model=d_model, n_layers=2, layer_idx=0, seq_len=16, pos=pos, rope_theta=100.0, bias=bias,
                        norm_eps=1e-5, init_std=0.2, out_std=0.2, dtype=jnp.float32, impl="xla")


def _x(seed=0, shape=(B, T, E)):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@nnx.jit
def _forward(m, x, positions, segment_ids):
    return m(x, positions=positions, segment_ids=segment_ids)


def _positions(Bn=B, Tn=T):
    return jnp.broadcast_to(jnp.arange(Tn, dtype=jnp.int32), (Bn, Tn))


def _uniform_identity_mixer(bias: bool) -> SoftmaxAttention:
    """d_model 4, two heads of 2: zero q/k projections (every visible key weighs the same), identity value and output
    projections, so y_t = mean over the visible s of v_s, and v_s = [x_s[:2], x_{s-1}[2:]] under the shift."""
    m = SoftmaxAttention(SoftmaxConfig(n_heads=2, value_shift=True), _ctx(4, bias, "none"), rngs=nnx.Rngs(0))
    p = jax.tree.map(np.array, params_of(m))
    p["q_proj"]["kernel"][:] = 0
    p["k_proj"]["kernel"][:] = 0
    p["v_proj"]["kernel"][:] = np.eye(4)
    p["o_proj"]["kernel"][:] = np.eye(4)
    if bias:
        for name in ("q_proj", "k_proj", "o_proj"):
            p[name]["bias"][:] = 0
        p["v_proj"]["bias"][:] = [0.0, 0.0, 10.0, 20.0]
    set_params(m, p)
    return m


X_HAND = jnp.asarray([[[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]]])


def test_hand_checked_half_the_value_channels_see_the_previous_token():
    # v_0 = [1, 2, 0, 0], v_1 = [5, 6, 3, 4], v_2 = [9, 10, 7, 8]; y_t is the running mean.
    expected = [[1.0, 2.0, 0.0, 0.0], [3.0, 4.0, 1.5, 2.0], [5.0, 6.0, 10 / 3, 4.0]]
    m = _uniform_identity_mixer(bias=False)
    np.testing.assert_allclose(np.asarray(_forward(m, X_HAND, _positions(1, 3), None))[0], expected, rtol=1e-6)


def test_hand_checked_with_bias_and_a_document_start():
    """A document's first token reads the projection of a zero row (the bias); no value crosses the boundary."""
    m = _uniform_identity_mixer(bias=True)
    # biased values: x + [0, 0, 10, 20] on the current half; the shifted half is x_{s-1}[2:] + [10, 20].
    one_doc = [[1.0, 2.0, 10.0, 20.0], [3.0, 4.0, 11.5, 22.0], [5.0, 6.0, 40 / 3, 24.0]]
    np.testing.assert_allclose(np.asarray(_forward(m, X_HAND, _positions(1, 3), None))[0], one_doc, rtol=1e-6)
    # Documents [0] and [1, 2]: token 1 starts a document, so its shifted half is the bias alone.
    seg = jnp.asarray([[0, 1, 1]], jnp.int32)
    pos = jnp.asarray([[0, 0, 1]], jnp.int32)
    two_docs = [[1.0, 2.0, 10.0, 20.0], [5.0, 6.0, 10.0, 20.0], [7.0, 8.0, 13.5, 24.0]]
    np.testing.assert_allclose(np.asarray(_forward(m, X_HAND, pos, seg))[0], two_docs, rtol=1e-6)


DECODE_CASES = {
    "mha": dict(n_heads=4),
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "mqa_split_inside_the_head": dict(n_heads=4, n_kv_heads=1),
    "share_qk": dict(n_heads=4, share="qk", qk_norm=True),
    "sliding_window_ring": dict(n_heads=4, n_kv_heads=2, sliding_window=4),
    "spkv_pruned_cache": dict(n_heads=4, n_kv_heads=2, spkv=SPKVConfig(window=4, init_bias=0.0)),
}


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_reproduces_forward(name, bias):
    m = SoftmaxAttention(SoftmaxConfig(value_shift=True, **DECODE_CASES[name]), _ctx(bias=bias), rngs=nnx.Rngs(0))
    if bias:  # non-zero biases, so the shifted half's fill at t = 0 is checked too
        set_params(m, jax.tree.map(lambda a: a + 0.5, params_of(m)))
    x = _x()
    full = _forward(m, x, _positions(), None)
    nnx.pop(m, Stat)
    assert_close(decode_all(m, x), full, rel=1e-5, name=name)


def test_same_parameters_and_flops_as_softmax_and_the_output_changes():
    cfg = SoftmaxConfig(n_heads=4, n_kv_heads=2)
    plain = SoftmaxAttention(cfg, _ctx(), rngs=nnx.Rngs(0))
    shifted = SoftmaxAttention(cfg.model_copy(update={"value_shift": True}), _ctx(), rngs=nnx.Rngs(0))
    params = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    assert params(shifted) == params(plain)
    assert shifted.flops_per_token(T) == plain.flops_per_token(T)
    assert shifted.cache_bytes_per_token() == plain.cache_bytes_per_token()
    late = 2 * 8 // 2  # half of n_kv_heads * head_dim
    assert shifted.state_bytes() == late * 4 and plain.state_bytes() == 0
    x = _x()
    y_plain, y_shift = _forward(plain, x, _positions(), None), _forward(shifted, x, _positions(), None)
    assert y_shift.shape == (B, T, E) and shifted.init_cache(B, T)["v_shift"].shape == (B, late)
    # Same weights: the first query sees only itself, and its shifted half is the zero row's projection.
    assert np.abs(np.asarray(y_shift[:, 1:] - y_plain[:, 1:])).max() > 1e-3


@pytest.mark.parametrize("extra, match", [(dict(share="kv"), "share: kv"), (dict(share="qkv"), "share: qkv"),
                                          (dict(short_conv=4), "short_conv"),
                                          (dict(n_kv_heads=1, head_dim=3), "1 * 3")])
def test_unsupported_combinations_are_refused(extra, match):
    errs = SoftmaxConfig(n_heads=4, value_shift=True, **extra).check(_ctx(pos="none"))
    assert any(e.startswith("value_shift:") and match in e for e in errs), errs
