"""The lightning mixer: both decay rules against hand-computed slopes, decoding against the full
forward, packed documents, its parameters, FLOPs against XLA's count, config errors.

Shapes are shared (B=2, T=70: a full 64-block and a ragged one, d_model 32, 4 heads of 8) so each
configuration compiles one forward and one decode program.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention.lightning import LightningAttention, LightningConfig, alibi_slopes, decay_slopes
from lm.config import ConfigError, load_config
from tests.attention.mixers import context, decode_all, forward, xla_flops_per_token
from tests.numerics import assert_close

B, T, D = 2, 70, 32
TINY = "configs/tiny/lightning.yaml"


def _mixer(ctx=None, **cfg):
    return LightningAttention(LightningConfig(**{"n_heads": 4, **cfg}), ctx or context(D), rngs=nnx.Rngs(0))


def _x(seed=0, shape=(B, T, D)):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def test_paper_rule_by_hand():
    # s = (8h/H)(1 - l/L), H=4, L=3: the per-layer factor is 1, 2/3, 1/3 and head 0 never decays.
    for layer, factor in ((0, 1.0), (1, 2 / 3), (2, 1 / 3)):
        np.testing.assert_allclose(decay_slopes("paper", 4, layer, 3), [0, 2 * factor, 4 * factor, 6 * factor],
                                   rtol=1e-12, atol=0)
    # The digest's numbers, H=8, L=24: l=23 gives [0, 0.042, 0.083, ...].
    np.testing.assert_allclose(decay_slopes("paper", 8, 23, 24)[:3], [0, 1 / 24, 2 / 24], rtol=1e-12)


def test_alibi_rule_by_hand():
    np.testing.assert_allclose(alibi_slopes(4), [1 / 4, 1 / 16, 1 / 64, 1 / 256], rtol=1e-12)
    # Not a power of 2: the slopes of 4, then every other slope of 8 (2^-1, 2^-3).
    np.testing.assert_allclose(alibi_slopes(6), [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8], rtol=1e-12)
    # s = a_h (1 - l/(L-1) + 1e-5), L=3: factors 1+1e-5, 1/2+1e-5, 1e-5 (the last layer barely decays).
    for layer, factor in ((0, 1 + 1e-5), (1, 0.5 + 1e-5), (2, 1e-5)):
        np.testing.assert_allclose(decay_slopes("alibi", 4, layer, 3), alibi_slopes(4) * factor, rtol=1e-12)
    np.testing.assert_allclose(decay_slopes("alibi", 4, 0, 1), alibi_slopes(4) * (1 + 1e-5), rtol=1e-12)
    # The digest's H=8, L=24, l=12: [0.239, 0.120, 0.060, ...].
    np.testing.assert_allclose(decay_slopes("alibi", 8, 12, 24)[:3], [0.239, 0.120, 0.060], atol=6e-4)


def test_decay_is_a_constant_not_a_parameter():
    m = _mixer(decay="paper")
    np.testing.assert_array_equal(m.log_decay, -decay_slopes("paper", 4, 1, 3))
    state = nnx.state(m)
    leaves = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    assert leaves and all(isinstance(v, nnx.Param) for v in leaves)
    names = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(state)}
    assert names == {"q_proj/kernel", "k_proj/kernel", "v_proj/kernel", "gate/0/kernel", "out_norm/scale",
                     "o_proj/kernel"}
    low = _mixer(gate_rank=3, norm="srmsnorm")
    assert low.gate[0].kernel.shape == (D, 3) and low.gate[1].kernel.shape == (3, D) and low.out_norm is None


VARIANTS = {
    "minimax": {},
    "tnl_paper": dict(decay="paper", norm="srmsnorm", gate_rank=5, feature_map="elu1", feature_map_v=True,
                      scale=None, head_dim=6),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_reproducesforward(variant):
    m = _mixer(**VARIANTS[variant])
    x = _x()
    full = forward(m, x, None)
    assert_close(decode_all(m, x), full, rel=1e-5, name="decode")
    assert m.state_bytes() == 4 * m.hd * m.hd * 4


def test_segments_isolate_documents():
    """Row 0: documents [0, 30) and [30, 70); row 1 reuses id 5 for a third document (a run of
    equal ids is one document). A later document sees neither the content of an earlier one nor
    its position: it equals the same tokens placed at the start of a row."""
    m = _mixer()
    seg = jnp.asarray([[0] * 30 + [1] * 40, [5] * 20 + [3] * 25 + [5] * 25], jnp.int32)
    x = _x()
    y = forward(m, x, seg)
    other = x.at[0, :30].set(_x(1)[0, :30]).at[1, :45].set(_x(2)[1, :45])
    y_other = forward(m, other, seg)
    assert_close(y_other[0, 30:], y[0, 30:], rel=1e-6, name="row 0, second document")
    assert_close(y_other[1, 45:], y[1, 45:], rel=1e-6, name="row 1, third document")
    assert float(jnp.max(jnp.abs(y_other[0, :30] - y[0, :30]))) > 1e-3  # the perturbation is real
    moved = jnp.concatenate([x[:, 30:], x[:, :30]], axis=1)
    alone = forward(m, moved, jnp.asarray([[0] * 40 + [1] * 30] * 2, jnp.int32))
    assert_close(alone[0, :40], y[0, 30:], rel=1e-5, name="document at the start of a row")


def test_flops_match_xla_cost_analysis():
    """At a shape where the op is about a third of the work, the analytic count is within 5% of
    what XLA counts for the compiled forward (a missing intra or inter term would be 10-20% off)."""
    d, Tf = 128, 256
    m = LightningAttention(LightningConfig(n_heads=2), context(d, seq_len=Tf, impl="xla"), rngs=nnx.Rngs(0))
    xla = xla_flops_per_token(m, jnp.zeros((1, Tf, d)))
    assert abs(m.flops_per_token(Tf) / xla - 1) < 0.05, (m.flops_per_token(Tf), xla)


@pytest.mark.parametrize("override, key", [
    ("model.mixers.lightning.n_heads=5", "model.mixers.lightning.n_heads: d_model 192 is not divisible"),
    ("model.mixers.lightning.decay=linear", "model.mixers.lightning.decay"),
    ("model.mixers.lightning.scale=0", "model.mixers.lightning.scale"),
    ("model.mixers.lightning.gate_rank=0", "model.mixers.lightning.gate_rank"),
    ("model.mixers.lightning.feature_maps=silu", "did you mean model.mixers.lightning.feature_map?"),
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert key in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
