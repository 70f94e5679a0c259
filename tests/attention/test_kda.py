"""The kda mixer: the short conv by hand, decoding against the full forward, packed documents (conv
and state), parameter init and never-decay metadata through the optimizer, FLOPs, config errors.

Shapes are shared (B=2, T=70: a full 64-chunk and a ragged one, d_model 32) so each configuration
compiles one forward and one decode program.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attention.kda import KDAConfig, KimiDeltaAttention
from attention.layers import causal_conv
from lm.config import ConfigError, OptimConfig, load_config
from lm.model import init_model
from lm.optim import make_optimizer
from tests.attention.mixers import context, decode_all, forward, xla_flops_per_token
from tests.numerics import assert_close

B, T, D = 2, 70, 32
TINY = "configs/tiny/kda.yaml"


def _mixer(ctx=None, **cfg):
    return KimiDeltaAttention(KDAConfig(**{"n_heads": 4, **cfg}), ctx or context(D), rngs=nnx.Rngs(0))


def _x(seed=0, shape=(B, T, D)):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def test_causal_conv_by_hand():
    x = np.arange(1.0, 6.0, dtype=np.float32)[None, :, None]  # one channel: 1 2 3 4 5
    w = np.asarray([[100.0], [10.0], [1.0]], np.float32)  # the last tap hits the current token
    y = causal_conv(jnp.asarray(x), jnp.asarray(w), jnp.zeros((1, 2, 1)))
    np.testing.assert_array_equal(y[0, :, 0], [1, 12, 123, 234, 345])
    # A document starting at t=3 (positions 0 1 2 0 1): taps never reach back past its start.
    pos = jnp.asarray([[0, 1, 2, 0, 1]])
    y = causal_conv(jnp.asarray(x), jnp.asarray(w), jnp.zeros((1, 2, 1)), pos)
    np.testing.assert_array_equal(y[0, :, 0], [1, 12, 123, 4, 45])
    # A decode step: the history stands in for the tokens before.
    y = causal_conv(jnp.asarray(x[:, 4:]), jnp.asarray(w), jnp.asarray(x[:, 2:4]))
    np.testing.assert_array_equal(y[0, :, 0], [345])


VARIANTS = {
    "kimi": {},
    # head_dim * n_heads != d_model, a shorter conv, an explicit scale, biases on every projection
    "other_shapes": dict(n_heads=2, head_dim=12, conv_size=2, scale=0.5, norm_eps=1e-6),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_reproduces_forward(variant):
    m = _mixer(context(D, bias=variant == "other_shapes"), **VARIANTS[variant])
    x = _x()
    assert_close(decode_all(m, x), forward(m, x, None), rel=1e-5, name="decode")
    width = m.H * m.hd
    assert m.state_bytes() == 4 * m.hd * m.hd * m.H + 3 * (m.W - 1) * width * 4


def test_segments_isolate_documents():
    """Row 0: documents [0, 30) and [30, 70); row 1 reuses id 5 for a third document. Changing only
    the last tokens of a document (what the short convs would read across the boundary) or all of
    it leaves the next one unchanged, and a later document equals the same tokens at a row start."""
    m = _mixer()
    seg = jnp.asarray([[0] * 30 + [1] * 40, [5] * 20 + [3] * 25 + [5] * 25], jnp.int32)
    x = _x()
    y = forward(m, x, seg)
    other = x.at[0, 27:30].set(_x(1)[0, 27:30]).at[1, :45].set(_x(2)[1, :45])
    y_other = forward(m, other, seg)
    assert_close(y_other[0, 30:], y[0, 30:], rel=1e-6, name="row 0, second document")
    assert_close(y_other[1, 45:], y[1, 45:], rel=1e-6, name="row 1, third document")
    assert float(jnp.max(jnp.abs(y_other[0, 27:30] - y[0, 27:30]))) > 1e-3  # the perturbation is real
    moved = jnp.concatenate([x[:, 30:], x[:, :30]], axis=1)
    alone = forward(m, moved, jnp.asarray([[0] * 40 + [1] * 30] * 2, jnp.int32))
    assert_close(alone[0, :40], y[0, 30:], rel=1e-5, name="document at the start of a row")


def test_gate_and_beta_ranges_and_unit_qk():
    m = _mixer()
    x = _x()[:, :8]
    raw = {"q": x @ jnp.ones((D, 32)), "k": x @ jnp.eye(D), "v": x}
    q, k, v, g, beta = m._inputs(x, raw)
    assert g.shape == (B, 8, 4, 8) and g.dtype == jnp.float32 and float(g.max()) <= 0
    assert beta.shape == (B, 8, 4) and 0 < float(beta.min()) and float(beta.max()) < 1
    np.testing.assert_allclose(jnp.linalg.norm(q, axis=-1), 1, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(k, axis=-1), 1, rtol=1e-5)


def test_init_and_never_decay():
    """A_log ~ log U[1,16], softplus(dt_bias) in [1e-3, 0.1]; both marked never_decay, so AdamW with
    wd_mask=all and a zero gradient leaves them unchanged while it shrinks the matrices."""
    m = _mixer(n_heads=8)
    A = np.exp(np.asarray(m.A_log[...]))
    dt = np.asarray(jax.nn.softplus(m.dt_bias[...]))
    assert A.shape == (8,) and A.min() >= 1 and A.max() <= 16 and A.std() > 1
    assert dt.shape == (8 * 4,) and dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert np.log(dt).max() - np.log(dt).min() > 2  # log-uniform spread over the range

    cfg = load_config(TINY, ["model.d_model=32", "model.n_layers=1", "model.mlp.hidden=64",
                             "model.mixers.kda.n_heads=2"])
    mdef, params = init_model(cfg)
    meta = mdef.meta()
    mixer_meta, mixer = meta["blocks"]["0"]["mixer"], params["blocks"]["0"]["mixer"]
    assert mixer_meta["A_log"].never_decay and mixer_meta["dt_bias"].never_decay
    assert not mixer_meta["q_proj"]["kernel"].never_decay and mixer_meta["q_proj"]["kernel"].decay
    tx, _ = make_optimizer(OptimConfig(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5,
                                       wd_mask="all"), 1, meta)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)["blocks"]["0"]["mixer"]
    for name in ("A_log", "dt_bias"):
        np.testing.assert_array_equal(new[name], mixer[name])
    assert float(jnp.max(jnp.abs(new["q_proj"]["kernel"] - mixer["q_proj"]["kernel"]))) > 0


def test_conv_init_options():
    """uniform: PyTorch's Conv1d default U(+-1/sqrt(W)); normal: N(0, model.init_std) as fla's model init."""
    W = 4
    uni = np.asarray(_mixer(n_heads=8).q_conv[...])
    assert uni.shape[0] == W and np.abs(uni).max() <= W ** -0.5 and np.abs(uni).max() > 0.8 * W ** -0.5
    nor = np.asarray(_mixer(n_heads=8, conv_init="normal").q_conv[...])
    std = context(D).init_std
    assert abs(nor.std() - std) < 0.15 * std and np.abs(nor).max() > 2 * std  # Gaussian tails, not a box


def test_flops_are_eq13_plus_what_xla_counts_for_the_rest():
    """The op term is the paper's Eq. 13 per head, 6 dh^2 + 3 C dh + C^2 at C = 64; the rest is
    checked against XLA's count of the forward with the token-by-token reference op, whose loop body
    XLA counts once, i.e. projections, convs and elementwise work only (a missing low-rank pair would
    be 16% off; elementwise work the analytic count leaves out is 4%)."""
    d, Tf = 128, 256
    m = KimiDeltaAttention(KDAConfig(n_heads=2), context(d, seq_len=Tf, impl="reference"), rngs=nnx.Rngs(0))
    eq13 = 2 * (6 * 64**2 + 3 * 64 * 64 + 64**2)
    rest = xla_flops_per_token(m, jnp.zeros((1, Tf, d)))
    assert abs((m.flops_per_token(Tf) - eq13) / rest - 1) < 0.08, (m.flops_per_token(Tf), eq13, rest)


@pytest.mark.parametrize("override, key", [
    ("model.mixers.kda.n_heads=5", "model.mixers.kda.n_heads: d_model 192 is not divisible"),
    ("model.mixers.kda.conv_size=1", "model.mixers.kda.conv_size"),
    ("model.mixers.kda.scale=-1", "model.mixers.kda.scale"),
    ("model.mixers.kda.head_dims=16", "did you mean model.mixers.kda.head_dim?"),
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert key in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
