"""The cca mixer: its math against an explicit numpy re-implementation (one left pad, two VALID convs by
loops over rows), the digest's special cases (tied-query CCGQA == CCA; identity or absent convs without
mean and shift == plain latent GQA, i.e. the softmax mixer with QK-norm), decode == forward, packed
documents, gradients, the paper's Table II numbers, config errors and the tiny configs.

Compilation dominates: every mixer-level case uses T = 12 (or the 15-token packed row) and d_model 32.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention.base import MixerContext
from attention.cca import CCAConfig, CCAttention
from attention.softmax import SoftmaxAttention, SoftmaxConfig
from lm.config import ConfigError, load_config
from lm.generate import decode_logits
from lm.info import model_info
from attention.layers import positions_from_segments
from lm.model import init_model
from tests.attention.mixers import params_of, set_params
from tests.numerics import assert_close

E, B, T = 32, 2, 12
THETA = 100.0  # small, so every rotated pair turns noticeably within 12 positions

CASES = {
    # name: (config, model-level bias)
    "cca": (CCAConfig(n_heads=4, n_kv_heads=4, head_dim=8), True),
    "ccgqa_k3": (CCAConfig(n_heads=4, n_kv_heads=2, head_dim=8, k0=3, k1=2, temp_clamp=0.1), True),
    "mqa_split_shift": (CCAConfig(n_heads=4, n_kv_heads=1, head_dim=8, k0=2, k1=3, conv_bias=False,
                                  rope_fraction=1.0), False),
    # the conv-confound control (configs/tiny/cca_noconv.yaml): both convs off
    "no_convs": (CCAConfig(n_heads=4, n_kv_heads=2, head_dim=8, k0=0, k1=0), True),
}


def _ctx(*, bias=True, pos="rope", norm_eps=1e-5) -> MixerContext:
    return MixerContext(d_model=E, n_layers=2, layer_idx=0, seq_len=16, pos=pos, rope_theta=THETA, bias=bias,
                        norm_eps=norm_eps, init_std=0.02, out_std=0.02, dtype=jnp.float32, impl="xla")


def _randomized(cfg, ctx, seed=0):
    """Every parameter drawn at scale 0.3, so biases, conv biases and temperatures are all non-zero."""
    m = CCAttention(cfg, ctx, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    set_params(m, jax.tree.map(lambda a: 0.3 * rng.standard_normal(a.shape), params_of(m)))
    return m


@nnx.jit
def _forward(m, x, positions, segment_ids):
    return m(x, positions=positions, segment_ids=segment_ids)


@nnx.jit
def _decode_step(m, x, cache, position):
    return m.decode(x, cache, position)


def _x(seed=1, T=T):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, E)), jnp.float32)


def _arange(T=T):
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


@functools.lru_cache(maxsize=None)
def _case(name):
    cfg, bias = CASES[name]
    return cfg, _ctx(bias=bias), _randomized(cfg, _ctx(bias=bias))


# ----------------------------------------------------------------------------------------------
# independent re-implementation


def _reference(p, cfg: CCAConfig, ctx: MixerContext, x, positions):
    """The layer in float64 numpy, one sequence and one token at a time.

    Listing-1 layout: the convs act on the fused [q0 | k0] channels (q heads first), in PyTorch Conv1d
    form (depthwise weight [channel, tap], grouped weight [head, tap, out, in]); one left pad of P zero
    rows, then two VALID convs. The value shift projects x[t-1] (zero row at t = 0) with its own columns.
    """
    x = np.asarray(x, np.float64)
    positions = np.asarray(positions)
    Hq, Hkv, d, k0, k1 = cfg.n_heads, cfg.kv_heads(), cfg.head_dim, cfg.k0, cfg.k1
    g, N, P = Hq // Hkv, Hq + Hkv, (k0 - 1) + (k1 - 1)
    r = cfg.rotary_dim(ctx)

    def lin(name, inp, cols=slice(None)):
        out = inp @ p[name]["kernel"][:, cols]
        return out + p[name]["bias"][cols] if ctx.bias else out

    def conv_bias(name):
        zero = np.zeros(N * d)
        if not cfg.conv_bias:
            return zero
        return np.concatenate([p["q_conv"][name].reshape(-1), p["k_conv"][name].reshape(-1)])

    w0 = np.concatenate([p["q_conv"]["w0"].reshape(k0, -1), p["k_conv"]["w0"].reshape(k0, -1)], axis=1).T
    w1 = np.concatenate([p["q_conv"]["w1"], p["k_conv"]["w1"]], axis=1).transpose(1, 0, 2, 3)
    b0, b1 = conv_bias("b0"), conv_bias("b1").reshape(N, d)
    beta = np.exp(p["log_temp"] if cfg.temp_clamp is None else np.minimum(p["log_temp"], cfg.temp_clamp))
    W = Hkv * d

    out = []
    for xb, pos in zip(x, positions):
        S = len(xb)
        q0, k0_ = lin("q_proj", xb), lin("k_proj", xb)
        u_pad = np.concatenate([np.zeros((P, N * d)), np.concatenate([q0, k0_], axis=1)], axis=0)
        a = np.zeros((S + k1 - 1, N * d))
        for t in range(S + k1 - 1):
            a[t] = b0 + sum(w0[:, j] * u_pad[t + j] for j in range(k0))
        c = np.zeros((S, N, d))
        for t in range(S):
            for h in range(N):
                c[t, h] = b1[h] + sum(w1[h, j] @ a[t + j, h * d:(h + 1) * d] for j in range(k1))
        q, k = c[:, :Hq], c[:, Hq:]
        q0h, k0h = q0.reshape(S, Hq, d), k0_.reshape(S, Hkv, d)
        if cfg.qk_mean:
            for h in range(Hq):
                q[:, h] += 0.5 * (q0h[:, h] + k0h[:, h // g])
            for j in range(Hkv):
                k[:, j] += 0.5 * (q0h[:, j * g:(j + 1) * g].mean(axis=1) + k0h[:, j])
        q = math.sqrt(d) * q / np.linalg.norm(q, axis=-1, keepdims=True)
        k = math.sqrt(d) * beta[:, None] * k / np.linalg.norm(k, axis=-1, keepdims=True)
        if r:
            ang = pos[:, None] * THETA ** (-np.arange(0, r, 2) / r)
            cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
            for z in (q, k):
                x1, x2 = z[..., :r // 2].copy(), z[..., r // 2:r].copy()
                z[..., :r // 2], z[..., r // 2:r] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        if cfg.value_shift:
            x_prev = np.concatenate([np.zeros((1, xb.shape[1])), xb[:-1]], axis=0)
            v = np.concatenate([lin("v_proj", xb, slice(0, W // 2)), lin("v_proj", x_prev, slice(W // 2, W))], 1)
        else:
            v = lin("v_proj", xb)
        v = v.reshape(S, Hkv, d)
        o = np.zeros((S, Hq, d))
        for t in range(S):
            for h in range(Hq):
                s = k[:t + 1, h // g] @ q[t, h] / math.sqrt(d)
                w = np.exp(s - s.max())
                o[t, h] = (w / w.sum()) @ v[:t + 1, h // g]
        out.append(lin("o_proj", o.reshape(S, Hq * d)))
    return np.stack(out)


# ----------------------------------------------------------------------------------------------
# math and decode


# The numpy reference writes out Listing 1, convs included; without convs the layer is checked against the
# conv-free layer below.
@pytest.mark.parametrize("name", [n for n in CASES if n != "no_convs"])
def test_matches_numpy_reference(name):
    cfg, ctx, m = _case(name)
    x = _x()
    y = _forward(m, x, _arange(), None)
    assert_close(y, _reference(params_of(m), cfg, ctx, x, _arange()), rel=1e-5, name=name)


def test_without_convs_q_and_k_are_the_latents():
    """k0 = k1 = 0 (configs/tiny/cca_noconv.yaml): no conv parameters, and the layer equals the reference with
    identity convs, i.e. zero-bias single-tap convs whose weights are the identity."""
    cfg, ctx, m = _case("no_convs")
    p = params_of(m)
    assert "q_conv" not in p and "k_conv" not in p
    Hq, Hkv, d = cfg.n_heads, cfg.kv_heads(), cfg.head_dim
    ident = dict(p, q_conv={"w0": np.ones((1, Hq, d)), "b0": np.zeros((Hq, d)),
                            "w1": np.broadcast_to(np.eye(d), (1, Hq, d, d)), "b1": np.zeros((Hq, d))},
                 k_conv={"w0": np.ones((1, Hkv, d)), "b0": np.zeros((Hkv, d)),
                         "w1": np.broadcast_to(np.eye(d), (1, Hkv, d, d)), "b1": np.zeros((Hkv, d))})
    x = _x()
    as_listing = cfg.model_copy(update={"k0": 1, "k1": 1})
    assert_close(_forward(m, x, _arange(), None), _reference(ident, as_listing, ctx, x, _arange()), rel=1e-5,
                 name="no convs = identity convs")


@pytest.mark.parametrize("name", list(CASES))
def test_decode_reproduces_forward(name):
    """Token-by-token decode into a longer cache (16 slots for 12 tokens) equals the full forward."""
    _, _, m = _case(name)
    x = _x()
    full = _forward(m, x, _arange(), None)
    cache = m.init_cache(B, 16)
    steps = []
    for t in range(T):
        y, cache = _decode_step(m, x[:, t:t + 1], cache, jnp.int32(t))
        steps.append(y)
    assert_close(jnp.concatenate(steps, axis=1), full, rel=1e-5, name=f"{name} decode")


def test_packed_documents_are_isolated():
    """Conv windows, value shift and attention restart at each document: a packed row equals each
    document run alone (numpy reference), and changing one document leaves the others' outputs alone."""
    cfg, ctx, m = _case("ccgqa_k3")
    lengths = (5, 2, 8)  # the 2-token document is shorter than the conv window
    seg = jnp.asarray(np.repeat(np.arange(3), lengths)[None].repeat(B, 0), jnp.int32)
    pos = positions_from_segments(seg)
    x = _x(seed=3, T=sum(lengths))
    y = np.asarray(_forward(m, x, pos, seg))
    p = params_of(m)
    start = 0
    for n in lengths:
        alone = _reference(p, cfg, ctx, x[:, start:start + n], _arange(n))
        assert_close(y[:, start:start + n], alone, rel=1e-5, name=f"document at {start}")
        start += n
    other = x.at[:, :7].set(x[:, :7] * -2.0 + 1.0)
    assert_close(_forward(m, other, pos, seg)[:, 7:], y[:, 7:], rel=1e-6, name="after the changed documents")


def test_tied_query_ccgqa_equals_cca():
    """CCGQA whose g query heads per group are copies of one CCA head (and whose output rows split that
    head's rows) is that CCA. Contiguous grouping (head h -> kv head h // g) in the qk-mean and in the
    attention is what makes it hold; an interleaved mapping would pair copies with the wrong kv head."""
    ctx, g = _ctx(), 2
    cca = _randomized(CCAConfig(n_heads=2, n_kv_heads=2, head_dim=8), ctx, seed=5)
    ccgqa = CCAttention(CCAConfig(n_heads=2 * g, n_kv_heads=2, head_dim=8), ctx, rngs=nnx.Rngs(0))
    p = params_of(cca)
    q = dict(p)
    d = 8
    q["q_proj"] = {"kernel": np.repeat(p["q_proj"]["kernel"].reshape(E, 2, d), g, axis=1).reshape(E, -1),
                   "bias": np.repeat(p["q_proj"]["bias"].reshape(2, d), g, axis=0).reshape(-1)}
    q["q_conv"] = {"w0": np.repeat(p["q_conv"]["w0"], g, axis=1), "b0": np.repeat(p["q_conv"]["b0"], g, axis=0),
                   "w1": np.repeat(p["q_conv"]["w1"], g, axis=1), "b1": np.repeat(p["q_conv"]["b1"], g, axis=0)}
    q["o_proj"] = {"kernel": np.repeat(p["o_proj"]["kernel"].reshape(2, d, E) / g, g, axis=0).reshape(-1, E),
                   "bias": p["o_proj"]["bias"]}
    set_params(ccgqa, q)
    x = _x()
    assert_close(_forward(ccgqa, x, _arange(), None), _forward(cca, x, _arange(), None), rel=1e-5,
                 name="tied CCGQA vs CCA")


@pytest.mark.parametrize("convs", ["absent", "identity"])
def test_plain_latent_gqa(convs):
    """Without convs (k0 = k1 = 0, or identity taps with zero biases), qk-mean and value shift, at
    temperature 1, the layer is GQA in the latent space with QK-norm: the softmax mixer with qk_norm."""
    ctx = _ctx(norm_eps=1e-12)
    k = 0 if convs == "absent" else 2
    cfg = CCAConfig(n_heads=4, n_kv_heads=2, head_dim=8, k0=k, k1=k, qk_mean=False, value_shift=False,
                    rope_fraction=1.0)
    m = CCAttention(cfg, ctx, rngs=nnx.Rngs(0))
    p = params_of(m)
    if k:
        for side in ("q_conv", "k_conv"):
            H = p[side]["b0"].shape[0]
            p[side] = {"w0": np.stack([np.zeros((H, 8)), np.ones((H, 8))]), "b0": np.zeros((H, 8)),
                       "w1": np.stack([np.zeros((H, 8, 8)), np.broadcast_to(np.eye(8), (H, 8, 8))]),
                       "b1": np.zeros((H, 8))}
        set_params(m, p)
    sm = SoftmaxAttention(SoftmaxConfig(n_heads=4, n_kv_heads=2, head_dim=8, qk_norm=True), ctx, rngs=nnx.Rngs(1))
    sp = params_of(sm)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        sp[name] = p[name]
    set_params(sm, sp)
    x = _x()
    assert_close(_forward(m, x, _arange(), None), _forward(sm, x, _arange(), None), rel=1e-5, name=convs)


def test_bf16_forward_and_decode_near_fp32():
    """bf16 compute and cache against the fp32 layer with the same weights: rel-RMSE within 2e-2 (bf16 keeps
    8 mantissa bits, about 4e-3 per rounding; measured 5e-3)."""
    cfg, bias = CASES["ccgqa_k3"]
    _, _, m32 = _case("ccgqa_k3")
    m16 = CCAttention(cfg, dataclasses.replace(_ctx(bias=bias), dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
    set_params(m16, params_of(m32))
    x = _x()
    want = _forward(m32, x, _arange(), None)
    assert_close(_forward(m16, x.astype(jnp.bfloat16), _arange(), None).astype(jnp.float32), want, rel=2e-2,
                 name="bf16 forward")
    cache = m16.init_cache(B, T, jnp.bfloat16)
    steps = []
    for t in range(T):
        y, cache = _decode_step(m16, x[:, t:t + 1].astype(jnp.bfloat16), cache, jnp.int32(t))
        steps.append(y.astype(jnp.float32))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(cache))
    assert_close(jnp.concatenate(steps, axis=1), want, rel=2e-2, name="bf16 decode")


def test_learned_positions_mean_no_rope_inside():
    cfg = CCAConfig(n_heads=4, n_kv_heads=2, head_dim=8)
    x, pos = _x(), _arange()
    learned = _randomized(cfg, _ctx(pos="learned"))
    assert_close(_forward(learned, x, 2 * pos, None), _forward(learned, x, pos, None), rel=1e-6, name="learned")
    roped = _randomized(cfg, _ctx())
    assert not np.allclose(_forward(roped, x, 2 * pos, None), _forward(roped, x, pos, None), atol=1e-3)


def test_gradients_finite_and_reach_every_parameter():
    _, _, m = _case("ccgqa_k3")
    seg = jnp.asarray([[0] * 5 + [1] * 7] * B, jnp.int32)
    graphdef, state = nnx.split(m)
    x = _x()
    w = jnp.asarray(np.random.default_rng(7).standard_normal((B, T, E)), jnp.float32)

    def loss(state, x):
        return jnp.sum(nnx.merge(graphdef, state)(x, positions=positions_from_segments(seg), segment_ids=seg) * w)

    g_state, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)
    assert np.isfinite(np.asarray(g_x)).all()
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(g_state)):
        leaf = np.asarray(leaf)
        assert np.isfinite(leaf).all(), path
        assert np.abs(leaf).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


# ----------------------------------------------------------------------------------------------
# analytic costs: the paper's Table II and the digest's worked numbers at E = 2048, d = 128


def _abstract(module_cls, cfg, ctx):
    return nnx.eval_shape(lambda: module_cls(cfg, ctx, rngs=nnx.Rngs(0)))


def _n_params(m) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.to_pure_dict(nnx.state(m, nnx.Param))))


BIG = dict(d_model=2048, n_layers=24, layer_idx=0, seq_len=16384, pos="rope", rope_theta=1e4, bias=False,
           norm_eps=1e-5, init_std=0.02, out_std=0.02, dtype=jnp.float32, impl="xla")
TABLE = {  # name: (module, config, params rounded as in the digest, KV elements per token)
    "MHA": (SoftmaxAttention, SoftmaxConfig(n_heads=16, head_dim=128), 16.8e6, 4096),
    "GQA-4": (SoftmaxAttention, SoftmaxConfig(n_heads=16, n_kv_heads=4, head_dim=128), 10.5e6, 1024),
    "CCA-4x": (CCAttention, CCAConfig(n_heads=4, n_kv_heads=4, head_dim=128), 4.46e6, 1024),
    "CCGQA-2x/8x": (CCAttention, CCAConfig(n_heads=8, n_kv_heads=2, head_dim=128), 5.58e6, 512),
}


@pytest.mark.parametrize("name", list(TABLE))
def test_worked_example_params_and_kv(name):
    cls, cfg, params, kv = TABLE[name]
    m = _abstract(cls, cfg, MixerContext(**BIG))
    n = _n_params(m)
    assert float(f"{n:.3g}") == params, n  # the digest gives three significant figures
    assert m.cache_bytes_per_token(dtype_bytes=1) == kv
    if cls is CCAttention:
        assert m.n_params() == n


def test_conv_parameter_convention():
    """Conv params from the layer's shapes (per side: k0 W + W, k1 heads d^2 + W) reproduce CCA-4x's 4.46M;
    the paper's footnote (2 e k_seq + e^2 / h k_ch with e = E / C, h = 4) would give 4.33M."""
    E_, d, heads, k = 2048, 128, 4, 2
    proj = 4 * E_ * heads * d
    e = heads * d
    footnote = 2 * e * k + e * e // heads * k
    assert round((proj + footnote) / 1e4) / 100 == 4.33
    shapes = 2 * (k * e + e + k * heads * d * d + e)
    assert _n_params(_abstract(CCAttention, TABLE["CCA-4x"][1], MixerContext(**BIG))) == proj + shapes + heads


def test_flops_match_table_ii():
    """Per-token forward FLOPs = Table II's per-token terms with S = keys a causal query sees on average,
    plus the conv term 2 (W_c k0 + N d^2 k1). Against MHA at 16384 visible keys, without the convs:
    4.0x fewer for CCA-4x and 2.16x for CCGQA-2x/8x (the digest's figures); the convs add about 1%."""
    E_, seq = 2048, 2 * 16384 - 1  # (seq + 1) / 2 = 16384 keys per query
    mha = _abstract(*TABLE["MHA"][:2], MixerContext(**BIG)).flops_per_token(seq)
    assert mha == 8 * E_ ** 2 + 4 * E_ * 16384
    for name, ratio, ratio_with_conv in (("CCA-4x", 4.0, 3.95), ("CCGQA-2x/8x", 2.16, 2.14)):
        cfg = TABLE[name][1]
        m = _abstract(CCAttention, cfg, MixerContext(**BIG))
        C1, C2 = E_ / (cfg.n_heads * 128), E_ / (cfg.kv_heads() * 128)
        N, Wc = cfg.n_heads + cfg.kv_heads(), (cfg.n_heads + cfg.kv_heads()) * 128
        conv = 2 * (Wc * cfg.k0 + N * 128 ** 2 * cfg.k1)
        table = (1 / C1 + 1 / C2) * 4 * E_ ** 2 + 4 * E_ * 16384 / C1
        assert m.flops_per_token(seq) == pytest.approx(table + conv, rel=1e-12)
        assert round(mha / table, 2) == ratio
        assert round(mha / (table + conv), 2) == ratio_with_conv


def test_state_bytes_zaya1():
    """ZAYA1 (8 q / 2 kv heads of 128, k0 = k1 = 2): 2 rows of 1280 raw latents + 128 shifted values."""
    m = _abstract(CCAttention, CCAConfig(n_heads=8, n_kv_heads=2, head_dim=128), MixerContext(**BIG))
    assert m.state_bytes(dtype_bytes=1) == 2 * 1280 + 128
    assert m.state_bytes() == 4 * (2 * 1280 + 128)
    no_state = _abstract(CCAttention, CCAConfig(k0=1, k1=1, value_shift=False), MixerContext(**BIG))
    assert no_state.state_bytes() == 0


# ----------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("overrides, key", [
    (["n_kv_heads=3"], "n_kv_heads: n_heads 8 is not divisible by n_kv_heads 3"),
    (["n_kv_heads=1", "head_dim=25", "rope_fraction=0"], "value_shift: half of the n_kv_heads * head_dim = 1 * 25"),
    (["head_dim=22"], "rope_fraction: 0.5 * head_dim 22 = 11 rotated channels"),
    (["k0=-1"], "model.mixers.ccgqa.k0"),
    (["rope_fraction=1.5"], "model.mixers.ccgqa.rope_fraction"),
    (["qk_means=false"], "did you mean model.mixers.ccgqa.qk_mean"),
])
def test_config_errors(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config("configs/tiny/ccgqa.yaml", [f"model.mixers.ccgqa.{o}" for o in overrides])


def test_odd_rope_ok_without_rope():
    load_config("configs/tiny/ccgqa.yaml", ["model.mixers.ccgqa.head_dim=22", "model.pos=learned"])


def test_tiny_configs_match_the_baseline():
    """4x less KV cache than the tiny MHA, with parameters matched to within 0.1% and never above it."""
    base = model_info(load_config("configs/tiny/softmax.yaml"))
    for path in ("configs/tiny/cca.yaml", "configs/tiny/ccgqa.yaml"):
        info = model_info(load_config(path))
        assert info["kv_cache_bytes_per_token"] * 4 == base["kv_cache_bytes_per_token"], path
        assert 0.999 * base["params"] <= info["params"] <= base["params"], path


def test_lm_decode_reproduces_forward():
    cfg = load_config("configs/tiny/ccgqa.yaml", ["model.d_model=48", "model.n_layers=2", "model.mlp.hidden=64",
                                                  "model.mixers.ccgqa.n_heads=4", "model.mixers.ccgqa.head_dim=8",
                                                  "model.bias=true"])
    mdef, params = init_model(cfg)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 256, (B, 10)), jnp.int32)
    full = jax.jit(lambda p, t: mdef.merge(p)(t))(params, toks)
    dec = jax.jit(lambda p, t: decode_logits(mdef, p, t))(params, toks)
    assert_close(dec, full, rel=1e-5, name="decode logits")
