"""MQAR: Zoology's figure-2 attention model (configs/mqar/zoology/attention.yaml; no MLP via mlp.kind identity,
where each block still adds its second norm's output as Zoology's Identity state mixer does, and its parameter
count from Zoology's module shapes), and the task with its pairs anywhere in the row (layout random)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def _recall_ok(batch) -> None:
    """Each scored target is the value that followed its query key's one earlier occurrence."""
    t, y, m = batch["tokens"], batch["targets"], batch["loss_mask"]
    for r in range(t.shape[0]):
        for q in np.nonzero(m[r])[0]:
            earlier = np.nonzero(t[r, :q] == t[r, q])[0]
            assert len(earlier) == 1 and t[r, earlier[0] + 1] == y[r, q], (r, q)


def test_pairs_at_random_positions():
    """layout random: the pairs sit anywhere, not at the start; each key is queried once, later, its answer
    scored; over many rows the first pair's position spreads over the row and no position range is special."""
    from lm.data.synthetic.tasks import mqar_batch

    b = mqar_batch(3, 0, batch_size=400, seq_len=512, n_pairs=4, vocab_size=128, layout="random")
    _recall_ok(b)
    assert (b["loss_mask"].sum(axis=1) == 4).all()
    t, m = b["tokens"], b["loss_mask"]
    firsts = np.array([min(np.nonzero(t[r, :q] == t[r, q])[0][0] for q in np.nonzero(m[r])[0]) for r in range(400)])
    pairs = np.array([np.nonzero(t[r, :q] == t[r, q])[0][0] for r in range(400) for q in np.nonzero(m[r])[0]])
    assert firsts.max() > 64 and np.mean(pairs < 8) < 0.05  # the start layout has every pair in positions 0-7
    hist = np.histogram(pairs, bins=4, range=(0, 512))[0]
    assert hist[0] > hist[-1] > 0  # earlier slots hold pairs more often (a pair precedes its query), none excluded
    start = mqar_batch(3, 0, batch_size=50, seq_len=512, n_pairs=4, vocab_size=128)
    _recall_ok(start)
    t, m = start["tokens"], start["loss_mask"]
    assert all(np.nonzero(t[r, :q] == t[r, q])[0][0] < 8 for r in range(50) for q in np.nonzero(m[r])[0])
    with pytest.raises(ValueError, match="power_a shapes the query gaps of layout start"):
        mqar_batch(3, 0, batch_size=2, seq_len=64, n_pairs=4, vocab_size=128, layout="random", power_a=1.0)
    with pytest.raises(ValueError, match="layout 'middle'"):
        mqar_batch(3, 0, batch_size=2, seq_len=64, n_pairs=4, vocab_size=128, layout="middle")
