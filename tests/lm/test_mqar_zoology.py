"""Zoology's figure-2 attention model (configs/mqar/zoology/attention.yaml): no MLP (mlp.kind identity, where
each block still adds its second norm's output, as Zoology's Identity state mixer does), and its parameter count
from Zoology's module shapes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lm.config import load_config
from lm.model import count_params, init_model

ZOOLOGY = "configs/mqar/zoology/attention.yaml"


def test_the_parameters_are_zoologys():
    """Tied 8192 x d embedding, d x 64 positions, per layer Wqkv (3d^2 + 3d), out_proj (d^2 + d) and two
    LayerNorms (4d), a final LayerNorm (2d): nothing for the MLP."""
    for d in (64, 128):
        mdef, params = init_model(load_config(ZOOLOGY, [f"model.d_model={d}"]))
        per_layer = 3 * d * d + 3 * d + d * d + d + 4 * d
        assert count_params(params) == 8192 * d + 64 * d + 2 * per_layer + 2 * d


def test_an_identity_mlp_adds_the_second_norms_output():
    cfg = load_config(ZOOLOGY, ["model.n_layers=1", "model.embed_dropout=0.0"])
    mdef, params = init_model(cfg)
    model = mdef.merge(params)
    block = model.blocks[0]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 64)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    after_mixer = x + block.mixer(block.norm1(x), positions=pos, segment_ids=None)
    out = block(x, pos, None, None)
    np.testing.assert_allclose(out, after_mixer + block.norm2(after_mixer), rtol=1e-6, atol=1e-6)
    assert block.mlp is None and jnp.isfinite(jax.jit(lambda p, t: mdef.merge(p)(t))(
        params, jnp.zeros((1, 16), jnp.int32))).all()
