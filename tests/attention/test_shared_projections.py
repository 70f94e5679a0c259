"""Projection sharing in the softmax mixer (share: kv|qk|qkv, pos2d): the paper's analytics, decode
against the full forward, literal tensor reuse, gradients through both uses, and config errors."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention import ops
from attention.base import MixerContext
from attention.base import visible_keys_per_query
from attention.softmax import SoftmaxAttention, SoftmaxConfig, sincos_features
from lm.cli import main
from lm.config import ConfigError, load_config
from lm.generate import decode_logits
from lm.info import model_info
from lm.model import abstract_model, init_model
from tests.numerics import assert_close

# ---------------------------------------------------------------------------------------------
# The paper's numbers, from its released code (comprehensive_flop_analysis_300M.json) and slides.

PAPER_300M_NON_ATTENTION = 221_566_976  # token + position embeddings, MLPs, LayerNorms (tied head counted once)
PAPER_300M = {  # variant: (attention parameters or None, fraction of the baseline K+V cache removed)
    "qkv": (83_968_000, 0.0),
    "share_kv": (62_976_000, 0.5),
    "share_qk": (62_976_000, 0.0),
    "share_qkv": (41_984_000, 0.5),
    "gqa4": (None, 0.75),
    "mqa": (None, 0.9375),
    "share_kv_gqa4": (None, 0.875),
    "share_kv_mqa": (None, 0.96875),
}
# Attention MACs per layer for one 2048-token sequence; between these variants only projections differ.
PAPER_300M_ATTN_MACS_T2048 = {"qkv": 17_179_869_184, "share_kv": 15_032_385_536, "share_qkv": 12_884_901_888}
PAPER_1B2 = {"qkv": 0.0, "share_kv": 0.5, "gqa8": 0.75, "mqa": 1 - 1 / 32, "share_kv_gqa8": 0.875,
             "share_kv_mqa": 1 - 1 / 64}


def test_paper_300m_params_and_flops(capsys):
    info = {}
    for variant, (attn_params, _) in PAPER_300M.items():
        if attn_params is not None:
            assert main(["info", f"configs/paper_qkv/300m/{variant}.yaml", "--json"]) == 0
            info[variant] = json.loads(capsys.readouterr().out)
            assert info[variant]["params"] == PAPER_300M_NON_ATTENTION + attn_params, variant
    assert info["qkv"]["params"] == 305_534_976 and info["share_kv"]["params"] == 284_542_976
    T, L = 2048, 20
    macs = PAPER_300M_ATTN_MACS_T2048
    for a, b in [("qkv", "share_kv"), ("qkv", "share_qkv"), ("share_kv", "share_qkv")]:
        assert info[a]["flops_per_token"] - info[b]["flops_per_token"] == 2 * L * (macs[a] - macs[b]) / T
    assert info["share_kv"]["flops_per_token"] == info["share_qk"]["flops_per_token"]


@pytest.mark.parametrize("size, cuts", [("300m", {v: cut for v, (_, cut) in PAPER_300M.items()}), ("1.2b", PAPER_1B2)])
def test_paper_cache_reductions(size, cuts):
    # Every layer is the same mixer, so one layer has the model's fractions (and builds 20x faster).
    info = {v: model_info(load_config(f"configs/paper_qkv/{size}/{v}.yaml", ["model.n_layers=1"])) for v in cuts}
    base = info["qkv"]["kv_cache_bytes_per_token"]
    for variant, cut in cuts.items():
        assert 1 - info[variant]["kv_cache_bytes_per_token"] / base == cut, variant


def test_paper_1b2_size():
    assert round(model_info(load_config("configs/paper_qkv/1.2b/qkv.yaml"))["params"] / 1e9, 1) == 1.2


@pytest.mark.parametrize("name", ["softmax", "share_kv", "share_qk", "share_qkv", "gqa4", "mqa", "share_kv_gqa4",
                                  "share_kv_mqa"])
def test_tiny_analytics_match_the_arrays(name):
    """Cache bytes are the bytes init_cache allocates; projection FLOPs are 2 x the projection kernels."""
    cfg = load_config(f"configs/tiny/{name}.yaml")
    mdef, shapes = abstract_model(cfg)
    model = mdef.merge(shapes)
    cache = model.init_cache(1, 4, jnp.float32)
    assert sum(a.nbytes for a in jax.tree.leaves(cache)) / 4 == model.cache_bytes_per_token(4)
    T = cfg.data.seq_len
    for i, block in enumerate(model.blocks):
        mixer = block.mixer
        kernels = sum(v["kernel"].size for k, v in shapes["blocks"][str(i)]["mixer"].items() if k.endswith("_proj"))
        scores = 4 * mixer.H * mixer.hd * visible_keys_per_query(T, None)
        assert mixer.flops_per_token(T) == 2 * kernels + scores


# ---------------------------------------------------------------------------------------------
# A single mixer, small enough to compile in about a second per variant.

B, T, D, H = 2, 11, 32, 4


def _mixer(pos="rope", n_kv_heads=None, impl="xla", **kw) -> SoftmaxAttention:
    cfg = SoftmaxConfig(n_heads=H, n_kv_heads=n_kv_heads, **kw)
    ctx = MixerContext(d_model=D, n_layers=2, layer_idx=0, seq_len=T, pos=pos, rope_theta=10000.0, bias=True,
                       norm_eps=1e-5, init_std=0.3, out_std=0.3, dtype=jnp.float32, impl=impl)
    assert cfg.check(ctx) == []
    mixer = SoftmaxAttention(cfg, ctx, rngs=nnx.Rngs(0))
    if mixer.pos2d_w is not None:
        # Trained-scale weights, so that both the Σw scaling and the position term move the output.
        mixer.pos2d_w.value = jax.random.normal(jax.random.PRNGKey(3), mixer.pos2d_w.shape) + 0.5
    return mixer


def _x(seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (B, T, D), jnp.float32)


def _positions():
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def _forward_and_decode(mixer, x):
    graphdef, state = nnx.split(mixer)

    @jax.jit
    def run(state, x):
        m = nnx.merge(graphdef, state)
        full = m(x, positions=_positions())

        def step(cache, t):
            y, cache = m.decode(jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1), cache, t)
            return cache, y[:, 0]

        _, ys = jax.lax.scan(step, m.init_cache(B, T, jnp.float32), jnp.arange(T))
        return full, ys.transpose(1, 0, 2)

    return run(state, x)


CASES = [dict(share=s, n_kv_heads=kv, pos=p)
         for s in ("none", "kv", "qk", "qkv") for kv in (None, 2, 1) for p in ("rope", "learned")
         if kv is None or s in ("none", "kv")]
CASES += [dict(share=s, pos=p, pos2d={"enabled": True}) for s in ("qk", "qkv") for p in ("rope", "learned")]
CASES += [dict(share=s, pos="rope", qk_norm=True) for s in ("kv", "qk", "qkv")]
# Sliding windows decode from a ring of `window` slots that wraps several times over T.
CASES += [dict(share=s, n_kv_heads=kv, pos="rope", qk_norm=s == "kv", sliding_window=3)
          for s, kv in (("none", 2), ("kv", None), ("qkv", None))]
CASES += [dict(share="qk", pos="learned", pos2d={"enabled": True}, sliding_window=4)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_decode_reproduces_forward(case):
    # The dense oracle compiles fastest; the blocked path runs in the gradient and pos2d tests below.
    full, dec = _forward_and_decode(_mixer(impl="reference", **case), _x())
    assert_close(dec, full, rel=1e-5, abs_max=1e-5, name="decoded output")


def test_sliding_window_cache_is_a_ring_of_the_window():
    mixer = _mixer(impl="reference", share="kv", sliding_window=3)
    cache = mixer.init_cache(B, 64, jnp.float32)
    assert cache["k"].shape[1] == 3 and "v" not in cache
    assert _mixer(impl="reference", share="none").init_cache(B, 64, jnp.float32)["k"].shape[1] == 64


def test_lm_decode_with_shared_projections_and_pos2d():
    """Through the model: GPT-2 recipe (learned positions), Q=K=V with the 2D term, token by token."""
    cfg = load_config("configs/tiny/share_qkv.yaml", [
        "model.d_model=32", "model.n_layers=1", "model.mlp.hidden=64", "model.mixers.softmax.n_heads=4",
        "data.seq_len=16", "model.norm=layernorm", "model.bias=true", "model.pos=learned", "model.mlp.kind=gelu",
        "model.tie_embeddings=true", "model.max_seq_len=16", "model.mixers.softmax.pos2d.enabled=true"])
    mdef, params = init_model(cfg)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)
    full = jax.jit(lambda p, t: mdef.merge(p)(t))(params, toks)
    dec = jax.jit(lambda p, t: decode_logits(mdef, p, t))(params, toks)
    assert_close(dec, full, rel=1e-5, name="decode logits")


# ---------------------------------------------------------------------------------------------
# Sharing is literal reuse of one array.

PROJECTIONS = {"kv": {"q_proj", "k_proj", "o_proj"}, "qk": {"k_proj", "v_proj", "o_proj"}, "qkv": {"k_proj", "o_proj"}}


@pytest.mark.parametrize("share", ["kv", "qk", "qkv"])
def test_shared_projection_is_one_array(share, monkeypatch):
    mixer = _mixer(pos="learned", share=share, impl="reference")
    assert set(nnx.to_pure_dict(nnx.state(mixer, nnx.Param))) == PROJECTIONS[share]
    seen = {}

    def spy(fn, q, k, v, *args, **kw):
        seen[fn.__name__] = (q is k, v is k)
        return fn(q, k, v, *args, **kw)

    monkeypatch.setattr(ops, "softmax_attention", functools.partial(spy, ops.softmax_attention))
    monkeypatch.setattr(ops, "softmax_decode", functools.partial(spy, ops.softmax_decode))
    x = _x()
    mixer(x, positions=_positions())
    mixer.decode(x[:, :1], mixer.init_cache(B, T), 0)
    q_is_k, v_is_k = share in ("qk", "qkv"), share in ("kv", "qkv")
    assert seen["softmax_attention"] == (q_is_k, v_is_k)
    assert seen["softmax_decode"][1] == v_is_k  # keys and values are the one cached array
    assert len(mixer.init_cache(B, T)) == (1 if v_is_k else 2)

    # With RoPE the shared projection is still one array; the scores get a rotated copy of it.
    q, k, v, _ = _mixer(pos="rope", share=share, impl="reference")._project(x)
    assert (q is k, v is k) == (q_is_k, v_is_k)


@pytest.mark.parametrize("share, pos", [("kv", "learned"), ("qk", "rope"), ("qkv", "learned")])
def test_gradient_reaches_shared_projection_from_every_use(share, pos):
    """The shared kernel's gradient is the sum of the gradients its separate copies would get (with learned
    positions the blocked op's custom VJP itself receives v is k and must add dk and dv)."""
    x, positions = _x(1), _positions()
    target = jax.random.normal(jax.random.PRNGKey(2), (B, T, D))
    shared = _mixer(pos=pos, share=share)
    split = _mixer(pos=pos, share="none")
    ps = nnx.to_pure_dict(nnx.state(shared, nnx.Param))
    pn = nnx.to_pure_dict(nnx.state(split, nnx.Param))
    for name in ("q_proj", "k_proj", "v_proj"):
        pn[name] = ps.get(name, ps["k_proj"])
    pn["o_proj"] = ps["o_proj"]

    def loss(mixer, p):
        graphdef, params, rest = nnx.split(mixer, nnx.Param, ...)
        nnx.replace_by_pure_dict(params, p)
        y = nnx.merge(graphdef, params, rest)(x, positions=positions)
        return jnp.mean((y - target) ** 2)

    value_and_grad = lambda mixer, p: jax.jit(jax.value_and_grad(functools.partial(loss, mixer)))(p)
    (ls, gs), (ln, gn) = value_and_grad(shared, ps), value_and_grad(split, pn)
    assert_close(ln, ls, rel=1e-6, name="same function")
    gs = gs["k_proj"]["kernel"]
    uses = [n for n in ("q_proj", "k_proj", "v_proj") if n not in ps or n == "k_proj"]
    parts = [gn[n]["kernel"] for n in uses]
    for part in parts:
        assert float(jnp.linalg.norm(part)) > 1e-3 * float(jnp.linalg.norm(gs))
    assert_close(gs, sum(parts), rel=1e-5, name="shared-kernel gradient")


def test_pos2d_is_the_papers_dense_score_map():
    """S' = S·Σw + Σ_c w_c·P[i,j,c] + b with the full P (row and column halves) and any b, then causal
    softmax, gives the mixer's output: the row half and b cancel, the column half is the key bias."""
    mixer = _mixer(pos="learned", share="qkv", pos2d={"enabled": True, "channels": 7})
    x = _x(4)
    w = mixer.pos2d_w.value
    half = 7 // 2
    i = jnp.arange(T)
    P = jnp.concatenate([jnp.broadcast_to(sincos_features(i, half)[:, None], (T, T, half)),
                         jnp.broadcast_to(sincos_features(i, 7 - half)[None], (T, T, 7 - half))], -1)

    @nnx.jit
    def both(mixer, x):
        k = mixer._project(x)[1]  # q = k = v
        S = jnp.einsum("bihd,bjhd->bhij", k, k) / jnp.sqrt(k.shape[-1])
        S = S * w.sum() + P @ w + 0.7
        S = jnp.where(i[:, None] >= i[None, :], S, -jnp.inf)
        o = jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(S, axis=-1), k)
        return mixer(x, positions=_positions()), mixer.o_proj(o.reshape(B, T, -1))

    actual, expected = both(mixer, x)
    assert_close(actual, expected, rel=1e-5, name="pos2d output")


# ---------------------------------------------------------------------------------------------
# Config errors name the key and the fix.

TINY = "configs/tiny/softmax.yaml"


@pytest.mark.parametrize("overrides, expected", [
    (["model.mixers.softmax.share=qk", "model.mixers.softmax.n_kv_heads=2"], "model.mixers.softmax.share: qk"),
    (["model.mixers.softmax.share=qkv", "model.mixers.softmax.n_kv_heads=1"], "share: kv"),
    (["model.mixers.softmax.share=kv", "model.mixers.softmax.pos2d.enabled=true"],
     "model.mixers.softmax.pos2d.enabled: the 2D positional term is for the symmetric variants"),
    (["model.mixers.softmax.pos2d.enabled=true"], "got share: none"),
    (["model.mixers.softmax.share=qk", "model.mixers.softmax.pos2d.chanels=4"],
     "did you mean model.mixers.softmax.pos2d.channels"),
    (["model.mixers.softmax.share=kq"], "model.mixers.softmax.share"),
    (["model.mixers.softmax.share=qk", "model.mixers.softmax.pos2d.channels=1"], "pos2d.channels"),
], ids=["qk-gqa", "qkv-mqa", "pos2d-kv", "pos2d-none", "pos2d-typo", "bad-share", "pos2d-one-channel"])
def test_config_errors(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert expected in str(e.value)


def test_grouped_key_value_sharing_is_valid():
    cfg = load_config("configs/tiny/share_kv_gqa4.yaml")
    mixer = cfg.model.mixers["softmax"]
    assert (mixer.share, mixer.kv_heads(), mixer.n_heads) == ("kv", 2, 8)
