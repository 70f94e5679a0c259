import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.config import load_config
from lm.generate import decode_logits, generate_ids, sample_logits
from attention.layers import positions_from_segments
from lm.model import count_params, init_model
from tests.numerics import assert_close

TINY = "configs/tiny/softmax.yaml"
SMALL = ["model.d_model=64", "model.n_layers=2", "model.mlp.hidden=128", "model.mixers.softmax.n_heads=4",
         "data.seq_len=32"]

GPT2 = ["model.norm=layernorm", "model.bias=true", "model.pos=learned", "model.mlp.kind=gelu",
        "model.tie_embeddings=true", "model.max_seq_len=64"]


def _model(extra=()):
    cfg = load_config(TINY, SMALL + list(extra))
    return cfg, *init_model(cfg)


def _tokens(B=2, T=24, V=256, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, T)), jnp.int32)


@pytest.mark.parametrize("extra", [
    [],
    ["model.mixers.softmax.n_kv_heads=2"],
    ["model.mixers.softmax.n_kv_heads=1"],
    ["model.mixers.softmax.sliding_window=5"],
    ["model.mixers.softmax.qk_norm=true", "model.mixers.softmax.pos=none"],
    GPT2,
], ids=["mha", "gqa2", "mqa", "window5", "qknorm_nope", "gpt2"])
def test_decode_reproduces_forward(extra):
    cfg, mdef, params = _model(extra)
    toks = _tokens()
    full = jax.jit(lambda p, t: mdef.merge(p)(t))(params, toks)
    dec = jax.jit(lambda p, t: decode_logits(mdef, p, t))(params, toks)
    assert_close(dec, full, rel=1e-5, name="decode logits")


def test_param_count_matches_formula():
    cfg, mdef, params = _model()
    d, L, V, F = 64, 2, 256, 128
    per_layer = 4 * d * d + 3 * d * F + 2 * d  # q,k,v,o + swiglu + 2 rmsnorm scales
    expected = V * d + L * per_layer + d + d * V  # embed, blocks, final norm, untied head
    assert count_params(params) == expected


def test_gpt2_recipe_param_count():
    cfg, mdef, params = _model(GPT2)
    d, L, V, F, P = 64, 2, 256, 128, 64
    attn = 4 * d * d + 4 * d  # with biases
    mlp = 2 * d * F + F + d
    norms = 2 * 2 * d
    expected = V * d + P * d + L * (attn + mlp + norms) + 2 * d  # tied head: no extra matrix
    assert count_params(params) == expected


@pytest.mark.parametrize("remat", ["block", "mixer"])
def test_remat_gives_same_loss_and_grads(remat):
    from lm.model import token_losses

    toks = _tokens()

    def loss(mdef, p):
        logits = mdef.merge(p)(toks[:, :-1])
        return jnp.mean(token_losses(logits, toks[:, 1:]))

    _, mdef_a, params = _model()
    _, mdef_b, _ = _model([f"model.remat={remat}"])
    la, ga = jax.value_and_grad(lambda p: loss(mdef_a, p))(params)
    lb, gb = jax.value_and_grad(lambda p: loss(mdef_b, p))(params)
    # remat is really applied: one checkpointed region per layer, none without it.
    n_layers = len(mdef_b.merge(params).blocks)
    remat_regions = lambda mdef: len(re.findall(r"\b(?:checkpoint|remat2?)\[", str(jax.make_jaxpr(
        lambda p: loss(mdef, p))(params))))  # the primitive's printed name varies across jax versions
    assert remat_regions(mdef_b) == n_layers and remat_regions(mdef_a) == 0
    assert_close(lb, la, rel=1e-6, name="loss")
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        assert_close(b, a, rel=1e-5, name="grad")


@pytest.mark.parametrize("policy", ["dots", "dots_no_batch", "mixer_out"])
def test_remat_policies_give_same_loss_and_grads_and_decide_what_is_saved(policy, capsys):
    from jax.ad_checkpoint import print_saved_residuals

    from lm.model import token_losses

    toks = _tokens()

    def loss_of(mdef):
        return lambda p: jnp.mean(token_losses(mdef.merge(p)(toks[:, :-1]), toks[:, 1:]))

    _, mdef_a, params = _model()
    _, mdef_n, _ = _model(["model.remat=block", "model.remat_policy=nothing"])
    _, mdef_p, _ = _model(["model.remat=block", f"model.remat_policy={policy}"])
    la, ga = jax.value_and_grad(loss_of(mdef_a))(params)
    lp, gp = jax.value_and_grad(loss_of(mdef_p))(params)
    assert_close(lp, la, rel=1e-6, name="loss")
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gp)):
        assert_close(b, a, rel=1e-5, name="grad")

    def saved(mdef) -> int:
        """How many arrays the forward pass keeps for the backward pass, besides the parameters."""
        print_saved_residuals(loss_of(mdef), params)
        return sum(1 for line in capsys.readouterr().out.splitlines() if "from the argument" not in line)

    n_layers = len(mdef_p.merge(params).blocks)
    nothing, with_policy = saved(mdef_n), saved(mdef_p)
    if policy == "mixer_out":  # one more array per layer: the mixer's output
        assert with_policy == nothing + n_layers
    else:  # the matmul outputs of every layer
        assert with_policy >= nothing + 4 * n_layers


def test_segments_isolate_documents():
    """With segment ids, a document's logits do not depend on the document packed before it."""
    cfg, mdef, params = _model()
    toks = _tokens(B=1, T=20)
    seg = jnp.asarray([[0] * 8 + [1] * 12], jnp.int32)
    other = toks.at[:, :8].set((toks[:, :8] + 7) % 256)
    f = jax.jit(lambda p, t, s: mdef.merge(p)(t, segment_ids=s))
    a = f(params, toks, seg)[:, 8:]
    b = f(params, other, seg)[:, 8:]
    alone = jax.jit(lambda p, t: mdef.merge(p)(t))(params, toks[:, 8:])
    assert_close(a, b, rel=1e-6, name="second document")
    assert_close(a, alone, rel=1e-5, name="document alone")


def test_positions_from_segments():
    seg = jnp.asarray([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert positions_from_segments(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_dropout_only_with_rng():
    cfg, mdef, params = _model(["model.dropout=0.5"])
    toks = _tokens()
    f = jax.jit(lambda p, t, r: mdef.merge(p)(t, rng=r))
    g = jax.jit(lambda p, t: mdef.merge(p)(t))
    a, b = f(params, toks, jax.random.PRNGKey(0)), f(params, toks, jax.random.PRNGKey(1))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    assert_close(f(params, toks, jax.random.PRNGKey(0)), a, rel=0, name="same key, same output")
    assert_close(g(params, toks), g(params, toks), rel=0, name="eval is deterministic")


def test_embedding_dropout_is_its_own_setting():
    """model.dropout is residual dropout only: with it alone the embeddings reach the first block undropped
    (the projection-sharing paper's setting); model.embed_dropout drops them."""
    toks = _tokens()
    seen = {}
    for name, over in (("residual", ["model.dropout=0.5"]), ("embed", ["model.embed_dropout=0.5"])):
        cfg, mdef, params = _model(over)
        model = mdef.merge(params)
        original = type(model.blocks[0]).__call__

        def spy(block, x, *a, _name=name, **kw):
            seen.setdefault(_name, x)
            return original(block, x, *a, **kw)

        type(model.blocks[0]).__call__ = spy
        try:
            model(toks, rng=jax.random.PRNGKey(0))
        finally:
            type(model.blocks[0]).__call__ = original
        seen[name + "_clean"] = model._embed(toks, jnp.broadcast_to(jnp.arange(toks.shape[1]), toks.shape))
    assert_close(seen["residual"], seen["residual_clean"], rel=0, name="no embedding dropout by default")
    dropped = np.asarray(seen["embed"]) == 0
    assert 0.3 < dropped.mean() < 0.7, "about half the embedding entries dropped"


def test_param_metadata():
    _, mdef, _ = _model(GPT2)
    meta = mdef.meta()
    q = meta["blocks"]["0"]["mixer"]["q_proj"]
    assert q["kernel"].axes == ("embed", "heads") and q["kernel"].decay
    assert not q["bias"].decay
    assert not meta["blocks"]["0"]["norm1"]["scale"].decay
    assert not meta["embed"]["embedding"].decay and meta["embed"]["embedding"].axes == ("vocab", "embed")


def test_sampling_rules():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    key = jax.random.PRNGKey(0)
    assert int(sample_logits(logits, key, temperature=0.0, top_k=None, top_p=None)[0]) == 0
    seen = {int(sample_logits(logits, jax.random.fold_in(key, i), temperature=1.0, top_k=2, top_p=None)[0])
            for i in range(200)}
    assert seen == {0, 1}
    seen = {int(sample_logits(logits, jax.random.fold_in(key, i), temperature=1.0, top_k=None, top_p=0.7)[0])
            for i in range(200)}
    assert seen == {0, 1}  # 0.5 < 0.7, so the token that crosses it (0.3) is kept, 0.15 is not


def test_greedy_generation_matches_argmax_of_forward():
    cfg, mdef, params = _model()
    prompt = _tokens(B=1, T=5)
    out = generate_ids(mdef, params, prompt, jax.random.PRNGKey(0), max_new_tokens=6)
    assert out.shape == (1, 11)
    assert out[:, :5].tolist() == prompt.tolist()
    full = mdef.merge(params)(out[:, :-1])
    assert out[0, 5:].tolist() == jnp.argmax(full[0, 4:], axis=-1).tolist()


def test_gelu_exact_and_dense_match_jax():
    """The MLP's custom-derivative erf GELU equals jax.nn.gelu(approximate=False) in value and derivative,
    and `dense` (matmul over flattened leading axes) equals jnp.dot on a 3-D input."""
    from attention.layers import dense, gelu_exact

    x = jnp.linspace(-9.0, 9.0, 4001, dtype=jnp.float32)
    assert_close(gelu_exact(x), jax.nn.gelu(x, approximate=False), rel=1e-6, name="gelu")
    d_ours = jax.vmap(jax.grad(gelu_exact))(x)
    d_jax = jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, approximate=False)))(x)
    assert_close(d_ours, d_jax, rel=1e-6, name="gelu'")
    a = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 16))
    w = jax.random.normal(jax.random.PRNGKey(1), (16, 7))
    assert_close(dense(a, w), jnp.dot(a, w), rel=1e-6, name="dense")
