"""SP-KV (attention/spkv.py) in the softmax and cca mixers: the gate's math (open gates are vanilla attention,
closed gates sliding-window attention, the anneal schedule), decoding through the pruned cache against the
hard-mask forward, the density and compression statistics on a hand-made case, the predictor's learning-rate
multiplier and freezing in the train step, --init-from, and what a training run logs.

Mixer-level cases use T = 12 tokens with a window of 4, so every sequence crosses the window boundary.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pydantic
import pytest
from flax import nnx

from attention.base import MixerContext, Stat, StatsReport, in_train_step
from attention.cache_policies import CachePolicy
from attention.cca import CCAConfig, CCAttention
from attention.softmax import SoftmaxAttention, SoftmaxConfig
from attention.pruned_cache import occupancy
from attention.spkv import SPKVCacheConfig, SPKVConfig, SPKVGate, anneal_alpha, report
from lm.checkpoint import Checkpointer
from lm.cli import build_parser
from lm.config import ConfigError, OptimConfig, load_config
from lm.model import abstract_model, init_model
from lm.optim import make_optimizer
from lm.tracking import read_metrics
from lm.train import RunError, build, params_from_run, train
from tests.lm.conftest import tiny_overrides
from tests.attention.mixers import params_of, set_params
from tests.numerics import assert_close

E, B, T, W = 32, 2, 12, 4


def _ctx() -> MixerContext:
    return MixerContext(d_model=E, n_layers=2, layer_idx=0, seq_len=16, pos="rope", rope_theta=100.0, bias=False,
                        norm_eps=1e-5, init_std=0.2, out_std=0.2, dtype=jnp.float32, impl="xla")


def _x(seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, E)), jnp.float32)


POSITIONS = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))


@nnx.jit
def _forward(m, x):
    return m(x, positions=POSITIONS)


@functools.partial(nnx.jit, static_argnames="total")
def _train_forward(m, x, step, total):
    with in_train_step(step, total):
        return m(x, positions=POSITIONS)


@nnx.jit
def _decode_all(m, x_BTD):
    """Token-by-token decode from a fresh pruned cache: outputs [B,T,D] and the final cache."""
    def step(cache, xs):
        x_BD, t = xs
        y, cache = m.decode(x_BD[:, None], cache, t)
        return cache, y[:, 0]

    cache, y_TBD = jax.lax.scan(step, m.init_cache(B, T), (x_BTD.swapaxes(0, 1), jnp.arange(T)))
    return y_TBD.swapaxes(0, 1), cache


def _pair(cfg, spkv: SPKVConfig):
    """The mixer with SP-KV and the same mixer without it, sharing every other parameter."""
    cls = CCAttention if isinstance(cfg, CCAConfig) else SoftmaxAttention
    gated = cls(cfg.model_copy(update={"spkv": spkv}), _ctx(), rngs=nnx.Rngs(0))
    plain = cls(cfg, _ctx(), rngs=nnx.Rngs(1))
    set_params(plain, {k: v for k, v in params_of(gated).items() if k != "spkv"})
    return gated, plain


def _popped_stats(m) -> dict:
    return {str(path[-1]): sum(np.asarray(v) for v in var.value)
            for path, var in nnx.to_flat_state(nnx.pop(m, Stat))}


MIXERS = {"softmax": SoftmaxConfig(n_heads=4, n_kv_heads=2), "cca": CCAConfig(n_heads=4, n_kv_heads=2, head_dim=8)}


# ----------------------------------------------------------------------------------------------
# the gate


@pytest.mark.parametrize("name", list(MIXERS))
def test_open_gates_are_vanilla_attention(name):
    """With the output bias at 30 every u is 1 - 1e-13: the soft training gate and the hard gate both leave
    attention as it was without SP-KV."""
    gated, plain = _pair(MIXERS[name], SPKVConfig(window=W, init_bias=30.0))
    x = _x()
    vanilla = _forward(plain, x)
    assert_close(_train_forward(gated, x, 0, 10), vanilla, rel=1e-6, name=f"{name} soft")
    assert_close(_forward(gated, x), vanilla, rel=1e-6, name=f"{name} hard")


def test_closed_gates_are_sliding_window_attention():
    """With the bias at -30 every key outside the window weighs exp(-30) (soft) or nothing (hard): the
    layer is sliding-window attention over the window."""
    cfg = MIXERS["softmax"]
    gated, plain = _pair(cfg, SPKVConfig(window=W, init_bias=-30.0))
    window = SoftmaxAttention(cfg.model_copy(update={"sliding_window": W}), _ctx(), rngs=nnx.Rngs(2))
    set_params(window, params_of(plain))
    x = _x()
    expected = _forward(window, x)
    assert_close(_train_forward(gated, x, 0, 10), expected, rel=1e-6, name="soft")
    assert_close(_forward(gated, x), expected, rel=1e-6, name="hard")
    assert float(jnp.max(jnp.abs(_forward(plain, x) - expected))) > 1e-2, "the window must cut keys off"


def test_anneal_schedule():
    """α is 0 until the freeze starts (the last F steps), rises in R equal steps to 1, and stays 1: the model
    trains its last F - R steps under the hard mask. `steps: N` means F = R = N (the ramp ends on the last step)."""
    alphas = [float(anneal_alpha(jnp.int32(s), 12, 6, 4)) for s in range(12)]
    assert alphas == [0, 0, 0, 0, 0, 0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [float(anneal_alpha(jnp.int32(s), 10, 4, 4)) for s in range(10)] == [0, 0, 0, 0, 0, 0, .25, .5, .75, 1.]
    shorthand = SPKVConfig(anneal={"steps": 62}).anneal
    assert (shorthand.freeze_steps, shorthand.ramp_steps) == (62, 62)
    with pytest.raises(pydantic.ValidationError, match="ramp_steps 8 is longer than freeze_steps 4"):
        SPKVConfig(anneal={"freeze_steps": 4, "ramp_steps": 8})
    with pytest.raises(pydantic.ValidationError, match="not both"):
        SPKVConfig(anneal={"steps": 4, "ramp_steps": 2})


def test_gate_values_soft_ramp_hard():
    """Per head a constant logit z (W2 = 0): log σ(z) while training, log max((1-α)σ(z) + α·1[σ(z) >= τ],
    1e-6) during the ramp, and once the ramp is done exactly the 0 / -inf mask that eval and the pruned cache
    use, inside a train step as outside one."""
    z = np.array([2.0, -0.5, 0.1])
    gate = SPKVGate(SPKVConfig(window=W, threshold=0.45, anneal={"freeze_steps": 6, "ramp_steps": 4}), _ctx(), 3,
                    rngs=nnx.Rngs(0))
    gate.w2[...] = jnp.zeros_like(gate.w2[...])
    gate.b2[...] = jnp.asarray(z, jnp.float32)
    x = _x()
    u = 1 / (1 + np.exp(-z))
    keep = u >= 0.45
    hard = np.asarray(gate(x))
    assert (hard[..., keep] == 0).all() and np.isneginf(hard[..., ~keep]).all()
    for step, alpha in ((5, 0.0), (6, 0.25), (8, 0.75)):
        with in_train_step(jnp.int32(step), 12):
            g = np.asarray(gate(x))
        expected = np.log(u) if alpha == 0 else np.log(np.maximum((1 - alpha) * u + alpha * keep, 1e-6))
        assert_close(g, np.broadcast_to(expected, g.shape), rel=1e-6, name=f"step {step}")
        assert gate.schedule_values(step, 12) == {"spkv_ramp": alpha}
    for step in (9, 10, 11):  # the ramp is over: the exact inference mask, -inf included
        with in_train_step(jnp.int32(step), 12):
            np.testing.assert_array_equal(np.asarray(gate(x)), hard)
        assert gate.schedule_values(step, 12) == {"spkv_ramp": 1.0}


# ----------------------------------------------------------------------------------------------
# pruned cache


DECODE_CASES = {
    "softmax_gqa": SoftmaxConfig(n_heads=4, n_kv_heads=2),
    "softmax_mqa": SoftmaxConfig(n_heads=4, n_kv_heads=1),
    # K=V with qk-norm: the cache holds un-rotated values; keys are re-derived at each slot's own position.
    "softmax_kv_shared_gqa": SoftmaxConfig(n_heads=4, n_kv_heads=2, share="kv", qk_norm=True),
    "cca_gqa": CCAConfig(n_heads=4, n_kv_heads=2, head_dim=8),
    "cca_mqa": CCAConfig(n_heads=4, n_kv_heads=1, head_dim=8),
}


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_pruned_cache_decode_equals_hard_mask_forward(name):
    """Token by token through the pruned cache (ring of 4 + store) == the full forward with the 0/-inf gate,
    and each head's cache holds exactly the window plus its kept older keys."""
    cfg = DECODE_CASES[name].model_copy(update={"spkv": SPKVConfig(window=W, init_bias=0.0)})
    cls = CCAttention if isinstance(cfg, CCAConfig) else SoftmaxAttention
    m = cls(cfg, _ctx(), rngs=nnx.Rngs(0))
    x = _x()
    full = _forward(m, x)
    nnx.pop(m, Stat)
    decoded, cache = _decode_all(m, x)
    assert_close(decoded, full, rel=1e-5, name=name)

    keep_BTH = np.asarray(m.spkv.logits(x)) >= 0.0  # τ = 0.5
    kept_BH = keep_BTH[:, :T - W].sum(axis=1)
    assert (0 < kept_BH).all() and (kept_BH < T - W).all(), "the case must prune some keys and keep others"
    np.testing.assert_array_equal(np.asarray(occupancy(cache)), W + kept_BH)


def _with_capacity(m: SoftmaxAttention, capacity: int) -> SoftmaxAttention:
    cfg = m.cfg.model_copy(update={"spkv": m.cfg.spkv.model_copy(update={"cache": SPKVCacheConfig(capacity=capacity)})})
    other = SoftmaxAttention(cfg, _ctx(), rngs=nnx.Rngs(0))
    set_params(other, params_of(m))
    return other


@functools.partial(nnx.jit, static_argnames="policy")
def _decode_under(m, x_BTD, policy):
    """`_decode_all` from a fresh cache under `policy`."""
    def step(cache, xs):
        y, cache = m.decode(xs[0][:, None], cache, xs[1])
        return cache, y[:, 0]

    cache, y_TBD = jax.lax.scan(step, m.init_cache(B, T, policy=policy), (x_BTD.swapaxes(0, 1), jnp.arange(T)))
    return y_TBD.swapaxes(0, 1), cache


def test_capacity_bounds_the_pool_and_counts_evictions():
    """spkv.cache.capacity sizes the pool the (sequence, KV head) pairs share: here pages of one key, so the pool
    holds 4 pairs x capacity keys. At the mean kept count per pair, rounded up, the densest pair holds more
    than its share, nothing is evicted and decode is exactly the hard-mask forward; one key less per pair, the
    pool runs out and every key admitted after that evicts (counted: the kept keys beyond the pool), and the
    outputs match the forward up to the first step the pool can be full."""
    base = DECODE_CASES["softmax_gqa"].model_copy(update={"spkv": SPKVConfig(window=W, init_bias=0.0)})
    m = SoftmaxAttention(base, _ctx(), rngs=nnx.Rngs(0))
    x = _x()
    full = _forward(m, x)
    nnx.pop(m, Stat)
    kept_BH = (np.asarray(m.spkv.logits(x)) >= 0.0)[:, :T - W].sum(axis=1)
    share = -(-int(kept_BH.sum()) // kept_BH.size)
    assert kept_BH.max() > share, "the case must have a pair denser than the mean"
    one_key_pages = CachePolicy("spkv", page=1)
    decoded, cache = _decode_under(_with_capacity(m, share), x, one_key_pages)
    assert cache["pages"]["k"].shape[:2] == (kept_BH.size * share, 1) and cache["k"].shape[1] == W
    assert_close(decoded, full, rel=1e-5, name="the pool holds every kept key")
    np.testing.assert_array_equal(cache["evicted"], 0)
    np.testing.assert_array_equal(cache["stored"], kept_BH)

    small = share - 1
    decoded, cache = _decode_under(_with_capacity(m, small), x, one_key_pages)
    assert int(np.sum(cache["evicted"])) == int(kept_BH.sum()) - kept_BH.size * small
    assert int(np.sum(cache["stored"])) == kept_BH.size * small
    np.testing.assert_array_equal(occupancy(cache), W + np.asarray(cache["stored"]))
    # Each step moves at most one key per pair, so the pool of `small` keys per pair can first overflow at step
    # W + small; up to then nothing is missing.
    assert_close(decoded[:, :W + small], full[:, :W + small], rel=1e-5, name="before any eviction")
    assert float(jnp.max(jnp.abs(decoded - full))) > 1e-4, "an evicted key must change some output"


# ----------------------------------------------------------------------------------------------
# statistics


def test_density_and_compression_hand_made():
    """x[..., 0] = +3 at positions 0, 7, 9 and -3 elsewhere. Head 0's logit is SiLU(x0) - 1 (kept only at
    those positions), head 1's is 5 (always kept). Window 4 of 12 tokens.

    Unpacked row: keys 0..7 leave the window (8 older), head 0 keeps 0 and 7. Packed row, documents of 7 and
    5 tokens: older keys are 0, 1, 2 and 7 (4), head 0 keeps 0 and 7.
    """
    gate = SPKVGate(SPKVConfig(window=W), _ctx(), 2, rngs=nnx.Rngs(0))
    for p in (gate.w1, gate.b1, gate.w2):
        p[...] = jnp.zeros_like(p[...])
    gate.w1[...] = gate.w1[...].at[0, 0].set(1.0)
    gate.w2[...] = gate.w2[...].at[0, 0].set(1.0)
    gate.b2[...] = jnp.asarray([-1.0, 5.0])
    x0 = np.full(T, -3.0)
    x0[[0, 7, 9]] = 3.0
    x = jnp.zeros((1, T, E)).at[0, :, 0].set(x0)

    gate(x)
    plain = _popped_stats(gate)
    gate(x, jnp.asarray([[1] * 7 + [2] * 5], jnp.int32))
    packed = _popped_stats(gate)
    np.testing.assert_array_equal(plain["spkv_kept"], [2, 8])
    np.testing.assert_array_equal(packed["spkv_kept"], [2, 4])
    assert (plain["spkv_older"], packed["spkv_older"], plain["spkv_keys"]) == (8, 4, 12)

    rep = report({"layer0.softmax": plain, "layer1.softmax": packed})
    r = rep.metrics
    assert rep.heatmaps["spkv_density_heads"].rows == r["spkv_density_heads"]
    assert rep.summary == [f"SP-KV density {r['spkv_density']:.3f} (cache {r['spkv_compression']:.2f}x smaller)"]
    assert r["spkv_density_heads"] == {"layer0.softmax": [0.25, 1.0], "layer1.softmax": [0.5, 1.0]}
    assert r["spkv_density/layer0.softmax"] == pytest.approx(10 / 16)
    assert r["spkv_density"] == pytest.approx((10 + 6) / (16 + 8))
    # Dense: 12 entries per head and layer. Pruned: the 4 (plain) or 8 (packed) keys that never leave the
    # window, plus the kept older keys.
    assert r["spkv_compression"] == pytest.approx((4 * 12) / ((4 + 2) + (4 + 8) + (8 + 2) + (8 + 4)))
    assert report({"layer0.kda": {}}) == StatsReport()


# ----------------------------------------------------------------------------------------------
# training: learning-rate multiplier, init-from, anneal freezing, logged metrics


def _spkv_overrides(store, run_dir, name, **extra) -> list[str]:
    spkv = {"model.mixers.softmax.spkv.window": 8, "model.mixers.softmax.spkv.anneal.freeze_steps": 3,
            "model.mixers.softmax.spkv.anneal.ramp_steps": 2,
            "model.mixers.softmax.spkv.density_reg": 0.1, "train.steps": 6, "optim.warmup_steps": 0}
    return tiny_overrides(store, run_dir, name, **{**spkv, **extra})


def _is_predictor(path) -> bool:
    return "spkv" in jax.tree_util.keystr(path)


def test_predictor_lr_mult_reaches_the_optimizer(tmp_path):
    cfg = load_config("configs/tiny/spkv.yaml", tiny_overrides("unused", tmp_path, **{
        "model.mixers.softmax.spkv.window": 8, "model.mixers.softmax.spkv.lr_mult": 3.0,
        "model.mixers.softmax.spkv.anneal": "null"}))
    mdef, shapes = abstract_model(cfg)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    opt = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0)
    tx, _ = make_optimizer(opt, 10, mdef.meta())
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    # Adam's first step moves every weight by lr (g / sqrt(g^2)); the predictor's by lr_mult times that.
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        assert_close(u, np.full(u.shape, -1e-2 * (3.0 if _is_predictor(path) else 1.0)), rel=1e-6,
                     name=jax.tree_util.keystr(path))


def _restore(run_dir) -> dict:
    ck = Checkpointer(run_dir / "checkpoints", keep=3)
    try:
        return jax.device_get(ck.restore_latest(build(load_config(run_dir / "config.yaml")).abstract_state())[1])
    finally:
        ck.close()


def _split(tree) -> tuple[dict, dict]:
    """{path: array} of the predictor's leaves and of all others (scalar step counts left out)."""
    pred, rest = {}, {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if np.ndim(x):
            (pred if _is_predictor(path) else rest)[jax.tree_util.keystr(path)] = np.asarray(x)
    return pred, rest


def test_init_from_anneal_freezing_and_logged_metrics(small_store, tmp_path, capsys):
    """A baseline trains 2 steps. The SP-KV model starts from it (matching arrays loaded, predictor at init)
    and trains 6 steps with the last 3 frozen and a 2-step ramp, stopping after 3: the predictor (parameters and
    Adam moments) has trained by then and stays bit-identical through steps 3-5, weight decay included, while
    every other array keeps changing. Every step logs the ramp; the eval lines carry density, compression and a
    heatmap."""
    base = train(load_config("configs/tiny/softmax.yaml", tiny_overrides(small_store, tmp_path, "base", **{
        "train.steps": 2})))
    cfg = load_config("configs/tiny/spkv.yaml", _spkv_overrides(small_store, tmp_path, "spkv"))

    fresh = jax.jit(lambda: init_model(cfg)[1])()
    messages = []
    loaded = params_from_run(fresh, base.run_dir, messages.append)
    base_params = _restore(base.run_dir)["params"]
    for path, x in jax.tree_util.tree_flatten_with_path(loaded)[0]:
        source = fresh if _is_predictor(path) else base_params
        expected = functools.reduce(lambda t, k: t[k.key], path, source)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(expected), err_msg=jax.tree_util.keystr(path))
    np.testing.assert_array_equal(loaded["blocks"]["0"]["mixer"]["spkv"]["b2"], 5.0)
    assert "initialised fresh: blocks.*.mixer.spkv.b1 (x2)" in messages[0] and "unused: none" in messages[0]
    _, other = abstract_model(load_config("configs/tiny/spkv.yaml", _spkv_overrides(
        small_store, tmp_path, "other", **{"model.d_model": 48})))
    with pytest.raises(RunError, match="no parameter of this model matches"):
        params_from_run(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), other), base.run_dir, messages.append)
    assert build_parser().parse_args(["train", "c.yaml", "--init-from", "runs/a"]).init_from == "runs/a"

    train(cfg, init_from=base.run_dir, max_steps_this_run=3)
    assert "init from" in capsys.readouterr().out
    at3 = _restore(tmp_path / "spkv")
    res = train(cfg, init_from=base.run_dir)
    assert "applies only to a fresh run and is ignored" in " ".join(capsys.readouterr().out.split())
    at6 = _restore(res.run_dir)
    pred_init, _ = _split(fresh)
    (pred3, rest3), (pred6, rest6) = _split(at3["params"]), _split(at6["params"])
    (pred_opt3, _), (pred_opt6, _) = _split(at3["opt"]), _split(at6["opt"])
    assert all(not np.array_equal(pred3[k], pred_init[k]) for k in pred_init), "the predictor trains first"
    for k in pred3:
        np.testing.assert_array_equal(pred6[k], pred3[k], err_msg=f"{k} moved while frozen")
    for k in pred_opt3:
        np.testing.assert_array_equal(pred_opt6[k], pred_opt3[k], err_msg=f"{k} moved while frozen")
    assert len(pred_opt3) == 2 * len(pred3)  # Adam's two moments
    assert all(not np.array_equal(rest6[k], rest3[k]) for k in rest3), "the rest of the model trains on"

    rows = read_metrics(res.run_dir / "metrics.jsonl")
    final = rows[-1]
    assert set(final["spkv_density_heads"]) == {"layer0.softmax", "layer1.softmax"}
    assert all(len(h) == 2 and all(0 <= d <= 1 for d in h) for h in final["spkv_density_heads"].values())
    older = 32 - 8  # seq_len 32, window 8
    assert final["spkv_compression"] == pytest.approx(32 / (8 + final["spkv_density"] * older))
    assert all(r["aux_loss"] > 0 for r in rows if "loss" in r)
    assert [r["spkv_ramp"] for r in rows if "loss" in r] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    assert (res.run_dir / "spkv_density_heads_step6.png").stat().st_size > 1000


def test_config_errors():
    with pytest.raises(ConfigError, match=r"unknown key model\.mixers\.softmax\.spkv\.windw \(did you mean "
                                          r"model\.mixers\.softmax\.spkv\.window\?\)"):
        load_config("configs/tiny/spkv.yaml", ["model.mixers.softmax.spkv.windw=3"])
    with pytest.raises(ConfigError, match=r"spkv\.window: 256 leaves no key outside the window"):
        load_config("configs/tiny/spkv.yaml", ["model.mixers.softmax.spkv.window=256"])
    with pytest.raises(ConfigError, match=r"spkv\.anneal\.freeze_steps: 400 is more than train\.steps 250"):
        load_config("configs/tiny/spkv.yaml", ["model.mixers.softmax.spkv.anneal.freeze_steps=400"])
    with pytest.raises(ConfigError, match=r"spkv\.cache\.capacity: a share of the older keys must be in \(0, 1\]"):
        load_config("configs/tiny/spkv.yaml", ["model.mixers.softmax.spkv.cache.capacity=1.5"])
    with pytest.raises(ConfigError, match=r"spkv\.cache\.capacity: a number of keys must be at least 1"):
        load_config("configs/tiny/spkv.yaml", ["model.mixers.softmax.spkv.cache.capacity=0"])
    assert load_config("configs/tiny/spkv.yaml", ["model.mixers.softmax.spkv.cache.capacity=0.25"]).model.mixers[
        "softmax"].spkv.cache.capacity == 0.25
    with pytest.raises(ConfigError, match=r"spkv: cannot be combined with sliding_window"):
        load_config("configs/tiny/spkv.yaml", ["model.mixers.softmax.sliding_window=64"])
    assert load_config("configs/tiny/spkv.yaml", ["model.mixers.softmax.spkv=null"]).model.mixers["softmax"].spkv \
        is None
    assert math.isclose(load_config("configs/tiny/spkv.yaml").model.mixers["softmax"].spkv.init_bias, 5.0)
    anneal = load_config("configs/tiny/spkv_cca.yaml").model.mixers["cca"].spkv.anneal
    assert (anneal.freeze_steps, anneal.ramp_steps) == (62, 25)
