"""Lightning attention op beyond the parity table (tests/kernels/lightning_cases.py): the reference against
hand-computed and dense values, the public entry point, prefill in parts, bf16 inputs, argument errors."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.ops import dispatch
from attention.ops.lightning import lightning
from attention.ops.lightning.pallas import lightning_pallas
from attention.ops.lightning.reference import lightning_reference
from attention.ops.lightning.xla import block_size, lightning_xla
from tests.kernels.lightning_cases import DECAYS, K, T_CASES, CASES, case_arrays, inputs, run, run_fn, segments
from tests.numerics import assert_close

def _dense(q, k, v, log_decay, scale, h0, segment_ids):
    """O(T^2) float64 formula: masked decay matrix exp(lambda (t-s)), plus the initial state's
    exp(lambda (t+1)) share for tokens in the first document."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    Bq, T = q.shape[:2]
    t = np.arange(T)
    if segment_ids is None:
        doc = np.zeros((Bq, T), np.int64)
    else:
        seg = np.asarray(segment_ids)
        doc = np.concatenate([np.zeros((Bq, 1), np.int64), np.cumsum(seg[:, 1:] != seg[:, :-1], axis=1)], axis=1)
    o = np.zeros(v.shape)
    S = np.zeros((Bq, q.shape[2], q.shape[3], v.shape[3]))
    for b in range(Bq):
        same = (doc[b][:, None] == doc[b][None, :]) & (t[:, None] >= t[None, :])
        last = doc[b] == doc[b, -1]
        for h, lam in enumerate(np.asarray(log_decay, np.float64)):
            dist = np.where(same, t[:, None] - t[None, :], 0)
            D = np.where(same, np.exp(lam * dist), 0.0)
            o[b, :, h] = scale * ((q[b, :, h] @ k[b, :, h].T) * D) @ v[b, :, h]
            w = np.where(last, np.exp(lam * (T - 1 - t)), 0.0)
            S[b, h] = (k[b, :, h] * w[:, None]).T @ v[b, :, h]
            if h0 is not None:
                h0_bh = np.asarray(h0[b, h], np.float64)
                first = doc[b] == 0
                o[b, :, h] += scale * np.where(first, np.exp(lam * (t + 1)), 0.0)[:, None] * (q[b, :, h] @ h0_bh)
                if last[0]:
                    S[b, h] += np.exp(lam * T) * h0_bh
    return o, S


def test_reference_by_hand():
    # gamma = 1/2, scale 1, K=2, V=1. S0 = k0 v0 = [2,0]; S1 = S0/2 + k1 v1 = [5,4];
    # S2 = S1/2 + k2 v2 = [2.5,18]; o_t = q_t . S_t = 2, 4, 20.5.
    q = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).reshape(1, 3, 1, 2)
    k = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]).reshape(1, 3, 1, 2)
    v = jnp.array([2.0, 4.0, 8.0]).reshape(1, 3, 1, 1)
    h0 = jnp.array([1.0, 2.0]).reshape(1, 1, 2, 1)
    ld = jnp.array([math.log(0.5)])
    cases = [
        # plain
        (dict(), [2.0, 4.0, 20.5], [2.5, 18.0]),
        # h0 adds gamma^(t+1) q_t . h0 = 0.5, 0.5, 0.375 and gamma^3 h0 to the state
        (dict(initial_state=h0), [2.5, 4.5, 20.875], [2.625, 18.25]),
        # a document starts at t=1: S1 = k1 v1 = [4,4], S2 = [2,18], h0 stays in document 0
        (dict(initial_state=h0, segment_ids=jnp.array([[3, 5, 5]])), [2.5, 4.0, 20.0], [2.0, 18.0]),
    ]
    for fn in (lightning_reference, lightning_xla, lightning_pallas):
        for kw, o_want, S_want in cases:
            o, S = fn(q, k, v, ld, scale=1.0, output_final_state=True, **kw)
            np.testing.assert_allclose(np.asarray(o).ravel(), o_want, rtol=1e-6)
            np.testing.assert_allclose(np.asarray(S).ravel(), S_want, rtol=1e-6)
        o, none = fn(q.astype(jnp.bfloat16), k, v, ld, scale=1.0)
        assert none is None and o.dtype == v.dtype


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_dense(case):
    """The oracle itself against the O(T^2) float64 formula on every parity case (tests/kernels)."""
    q, k, v, ld, h0, _, _, seg = case_arrays(case)
    o, S, _ = run("reference", case)
    o_dense, S_dense = _dense(q, k, v, ld, K ** -0.5, h0, seg)
    assert_close(o, o_dense, rel=1e-5, name="reference o vs dense")
    assert_close(S, S_dense, rel=1e-5, name="reference state vs dense")


def test_public_api_default_block():
    """Through `lightning`: auto picks xla (no kernel yet), the backend's block with a ragged tail,
    segments, an explicit scale; the choice is recorded."""
    T = block_size() + 13
    q, k, v, h0, do, dS = inputs(T, seed=7)
    seg = segments(T, [[3, block_size()], [T - 5]])
    ld = jnp.array(DECAYS)
    kw = dict(scale=0.3, initial_state=h0, output_final_state=True, segment_ids=seg)

    def call(impl, **kw):
        return jax.jit(lambda *a: lightning(*a, impl=impl, **kw))(q, k, v, ld)

    dispatch.clear_choices()
    o, S = call("auto", **kw)
    (choice,) = [c for _, c in dispatch.choices() if c.op == "lightning"]
    assert choice.chosen == ("xla" if jax.default_backend() == "cpu" else "pallas")
    o_ref, S_ref = call("reference", **kw)
    assert_close(o, o_ref, rel=1e-5, name="o")
    assert_close(S, S_ref, rel=1e-5, name="final state")


def test_prefill_in_two_parts():
    """Two xla calls, the first one's final state as the second one's initial state, continue the
    sequence exactly as one call does."""
    T = 40
    q, k, v, h0, _, _ = inputs(T, seed=3)
    ld = jnp.array(DECAYS)
    run = jax.jit(lambda q, k, v, h0: lightning_xla(q, k, v, ld, initial_state=h0, output_final_state=True, block=8))
    first, second = ((q[:, s], k[:, s], v[:, s]) for s in (slice(0, T // 2), slice(T // 2, T)))
    o1, S1 = run(*first, h0)  # 20 tokens: a ragged block at the cut
    o2, S2 = run(*second, S1)
    o, S = jax.jit(lambda *a: lightning_reference(*a, ld, initial_state=h0, output_final_state=True))(q, k, v)
    assert_close(jnp.concatenate([o1, o2], axis=1), o, rel=1e-5, name="o")
    assert_close(S2, S, rel=1e-5, name="final state")


# impl -> (its function and test options, bounds on the rel-RMSE of (state and its gradient, dlog_decay) in bf16).
# xla keeps every product in fp32, so the state, its gradient and the decay's gradient stay fp32-exact. The kernels
# feed every matmul bf16 operands as tensor cores want (the intra-chunk weights, the decayed keys that build the
# state, the decayed queries that build the state's gradient), accumulating in fp32: measured rel-RMSE state
# 9.5e-4, dh0 1.4e-3, dlog_decay 2.5e-3, o and input gradients 2.4e-3 to 2.7e-3 (xla: 1.6e-3 to 1.7e-3).
BF16 = {"xla": (lightning_xla, (("block", 16),), 1e-5, 1e-5),
        "pallas": (lightning_pallas, (("chunk", 16),), 3e-3, 1e-2)}


@pytest.mark.parametrize("impl", list(BF16))
def test_bf16inputs(impl):
    """bf16 q,k,v against the fp32 reference on the same (bf16-rounded) values. o and the input gradients are
    rounded once to bf16 (relative 2^-9 per element), hence rel-RMSE <= 4e-3 for those."""
    fn, opts, state_bound, decay_bound = BF16[impl]
    q, k, v, h0, do, dS = inputs(T_CASES, seed=5, dtype=jnp.bfloat16)
    do = do.astype(jnp.bfloat16).astype(jnp.float32)
    seg = segments(T_CASES, [[21], []])
    ld = jnp.array(DECAYS)
    o, S, grads = run_fn(fn, q, k, v, ld, h0, do, dS, segment_ids=seg, opts=opts)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    o_ref, S_ref, grads_ref = run_fn(lightning_reference, *f32, ld, h0, do, dS, segment_ids=seg)
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    assert_close(o, o_ref, rel=4e-3, name="o")
    assert_close(S, S_ref, rel=state_bound, name="final state")
    for name, g, r in zip(["dq", "dk", "dv"], grads[:3], grads_ref[:3]):
        assert g.dtype == jnp.bfloat16
        assert_close(g, r, rel=4e-3, name=name)
    assert_close(grads[3], grads_ref[3], rel=decay_bound, name="dlog_decay")
    assert_close(grads[4], grads_ref[4], rel=state_bound, name="dh0")


def _bad_calls():
    """(id, message the ValueError must contain, arguments)."""
    q = jnp.zeros((1, 5, 2, 4))
    v = jnp.zeros((1, 5, 2, 3))
    ok = dict(q=q, k=q, v=v, log_decay=jnp.array([0.0, -1.0]))
    return [
        ("q_ndim", "q must be", dict(ok, q=q[0])),
        ("k_shape", "k shape", dict(ok, k=jnp.zeros((1, 5, 2, 3)))),
        ("v_shape", "v shape", dict(ok, v=jnp.zeros((1, 5, 3, 3)))),
        ("int_inputs", "floating point", dict(ok, q=q.astype(jnp.int32), k=q.astype(jnp.int32))),
        ("empty_time", "time dimension", dict(ok, q=q[:, :0], k=q[:, :0], v=v[:, :0])),
        ("decay_shape", "log_decay must have shape", dict(ok, log_decay=jnp.zeros(3))),
        ("decay_positive", "log_decay must be finite and <= 0", dict(ok, log_decay=jnp.array([0.0, 0.1]))),
        ("decay_nan", "log_decay must be finite and <= 0", dict(ok, log_decay=jnp.array([jnp.nan, -1.0]))),
        ("decay_minus_inf", "log_decay must be finite and <= 0", dict(ok, log_decay=jnp.array([-jnp.inf, -1.0]))),
        ("scale_vector", "scale must be a scalar", dict(ok, scale=jnp.ones(2))),
        ("scale_inf", "scale must be finite", dict(ok, scale=float("inf"))),
        ("h0_shape", "initial_state must have shape", dict(ok, initial_state=jnp.zeros((1, 2, 3, 4)))),
        ("segments_shape", "segment_ids must have shape", dict(ok, segment_ids=jnp.zeros((1, 4), jnp.int32))),
        ("segments_float", "segment_ids must be integers", dict(ok, segment_ids=jnp.zeros((1, 5)))),
        ("unknown_impl", "impl=", dict(ok, impl="cuda")),
    ]


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("match,kw", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_argument_errors(match, kw):
    with pytest.raises(ValueError, match=match):
        lightning(**kw)


def test_auto_takes_xla_on_the_cpu_and_explicit_pallas_runs():
    q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 2, 4)), jnp.float32)
    dispatch.clear_choices()
    auto, _ = lightning(q, q, q, jnp.full(2, -0.1), impl="auto")
    chosen = dict(dispatch.choices())[""]
    assert chosen.chosen == ("xla" if jax.default_backend() == "cpu" else "pallas")
    explicit, _ = lightning(q, q, q, jnp.full(2, -0.1), impl="pallas")
    assert_close(explicit, auto, rel=1e-5, name="pallas against auto")
