"""Softmax attention op beyond the parity table (tests/kernels/softmax_cases.py): the reference against
hand-computed values, tile skipping, empty rows, bf16 inputs, decode, argument errors and dispatch.

Tests that need special inputs (NaN poison, closed gates, bf16's fp32 oracle) reuse a parity case's shapes
and options, so the table's jit cache serves them.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.extend
import jax.numpy as jnp
import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from attention.ops import dispatch
from attention.ops.softmax import softmax_attention, softmax_decode
from attention.ops.softmax.api import KeyPages
from attention.ops.softmax.reference import softmax_attention_reference
from attention.ops.softmax import xla
from attention.ops.softmax.xla import _Plan, softmax_attention_xla
from tests.kernels.softmax_cases import B, DV, case_arrays, inputs, run as _run_case
from tests.numerics import assert_close

# --- the reference itself ----------------------------------------------------------------------


def test_reference_matches_hand_computed_two_tokens():
    # D=1, scale=1. Query 1 sees logits (0, ln 3) -> weights (1/4, 3/4); query 0 sees only key 0.
    # Key 0 gated by ln(1/3) (1 step back, local_window=1): logits (ln 1/3, ln 3) -> weights (1/10, 9/10).
    q = jnp.ones((1, 2, 1, 1))
    k = jnp.array([0.0, math.log(3.0)]).reshape(1, 2, 1, 1)
    v = jnp.array([2.0, 6.0]).reshape(1, 2, 1, 1)
    gate = jnp.array([math.log(1 / 3), 0.0]).reshape(1, 2, 1)
    plain, mixed, gated = 2.0, 0.25 * 2 + 0.75 * 6, 0.1 * 2 + 0.9 * 6
    calls = [
        (dict(), [plain, mixed]),
        (dict(key_log_gate=gate, local_window=1), [plain, gated]),
        (dict(key_log_gate=gate, local_window=2), [plain, mixed]),  # key 0 is inside the window
        (dict(causal=False), [mixed, mixed]),
    ]
    for kw, want in calls:
        o = jax.jit(functools.partial(softmax_attention_reference, scale=1.0, **kw))(q, k, v)
        np.testing.assert_allclose(np.asarray(o).ravel(), want, rtol=1e-6, err_msg=str(kw))
    # d o_1 / d logit_0 = w_0 (v_0 - o_1) = 0.1 * (2 - 5.6): only query 1 gates key 0, and nothing
    # gates key 1 (0 steps back), so d(o_0 + o_1)/d gate = (-0.36, 0).
    for fn in (softmax_attention_reference, softmax_attention_xla):
        o, dgate = jax.jit(jax.value_and_grad(
            lambda g: fn(q, k, v, scale=1.0, key_log_gate=g, local_window=1).sum()))(gate)
        np.testing.assert_allclose(float(o), plain + gated, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(dgate).ravel(), [0.1 * (2 - gated), 0.0], rtol=1e-5, atol=1e-7)


def test_reference_default_scale_and_gqa_head_mapping():
    # Query head h reads kv head h // (Hq // Hkv): with kv heads holding different constant values,
    # each query head's output names its kv head.
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 3, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 3, 2, 16)), jnp.float32)
    v = jnp.broadcast_to(jnp.array([10.0, 20.0])[None, None, :, None], (1, 3, 2, 1))
    ref = jax.jit(softmax_attention_reference, static_argnames="scale")
    np.testing.assert_allclose(np.asarray(ref(q, k, v))[0, :, :, 0], [[10, 10, 20, 20]] * 3, rtol=1e-6)
    assert_close(ref(q, k, k), ref(q, k, k, scale=16 ** -0.5), rel=0, name="scale=None is D**-0.5")


# --- behaviour beyond the parity table (tests/kernels) -------------------------------------------


def test_rows_without_keys_give_zero_and_finite_gradients():
    for impl in ("reference", "xla", "pallas", "pallas-pipeline"):
        o, dq, *_ = _run_case(impl, "T>S-gate-local0")
        np.testing.assert_array_equal(np.asarray(o)[:, :16], 0.0, err_msg=impl)
        np.testing.assert_array_equal(np.asarray(dq)[:, :16], 0.0, err_msg=impl)
        # A -inf gate on every key (hard-mask emulation, local_window=0) empties every row.
        arrays, _ = case_arrays("T>S-gate-local0")
        outs = _run_case(impl, "T>S-gate-local0", gate=jnp.full_like(arrays["gate"], -jnp.inf))
        for what, x in zip(("o", "dq", "dk", "dv", "dgate"), outs):
            np.testing.assert_array_equal(np.asarray(x), 0.0, err_msg=f"{impl} {what}")


@pytest.mark.parametrize("name, poisoned_keys, clean_rows", [
    ("causal-mha-large-logits", slice(48, None), slice(None, 48)),
    # Window 20: query 64 reaches back to key 45, so its block never loads kv blocks 0 and 1.
    ("v-is-k-sliding-window", slice(None, 32), slice(64, None)),
    # Documents start at 41 and 33 in the two rows: query blocks from 48 on never load keys 0..31.
    ("segments-gate-everywhere", slice(None, 32), slice(48, None)),
])
@pytest.mark.parametrize("impl", ["xla", "pallas", "pallas-pipeline"])
def test_masked_tiles_are_skipped_not_masked(name, poisoned_keys, clean_rows, impl):
    # NaN keys/values poison every tile that loads them, fully masked or not (0 * NaN = NaN), so finite
    # rows prove that the implementation never computed those tiles, forward or backward.
    arrays, _ = case_arrays(name)
    S = arrays["k"].shape[1]
    poison = jnp.zeros((S,)).at[poisoned_keys].set(jnp.nan)[None, :, None, None]
    o, dq, *_ = _run_case(impl, name, k=arrays["k"] + poison, v=arrays["v"] + poison)
    assert np.isfinite(np.asarray(o)[:, clean_rows]).all()
    assert np.isfinite(np.asarray(dq)[:, clean_rows]).all()
    assert np.isnan(np.asarray(o)).any(), "the poison did not reach any row; the test checks nothing"


@pytest.mark.parametrize("impl", ["xla", "pallas", "pallas-pipeline"])
def test_spkv_keys_a_hard_gate_closes_are_never_read(impl):
    # Queries sit at 50..89 with a 16-key local window; closed keys before 32 are outside every query's window.
    # NaN there poisons the dense math (the reference: NaN + -inf is NaN); an implementation that gathers the
    # kept keys never reads them (xla, and the flash kernel's row driver and TPU pipeline).
    name = "T<S-hard-gate-v-is-k"
    arrays, _ = case_arrays(name)
    closed = ~np.isfinite(np.asarray(arrays["gate"]))
    closed[:, 32:] = False
    poisoned_k = arrays["k"] + jnp.where(jnp.asarray(closed)[..., None], jnp.nan, 0.0)
    assert np.isnan(np.asarray(_run_case("reference", name, k=poisoned_k)[0])).all()
    for what, x in zip(("o", "dq", "dk", "dv", "dgate"), _run_case(impl, name, k=poisoned_k)):
        assert x is None or np.isfinite(np.asarray(x)).all(), what


def test_spkv_tiles_follow_the_gate_density():
    """With a hard gate the xla path visits the local window's band and only the compact blocks of kept keys
    that a query block can see: at 10% of the keys kept and T=1024 (16 blocks) it visits under 40% of the dense
    causal tiles (a quarter of them are the band), and
    with every key kept about as many as dense attention."""
    B, T, H, D, window = 1, 1024, 1, 8, 64
    q, k, v, _, _ = inputs(T, T, H, H)
    keep = np.random.default_rng(0).random((B, T, H))

    def tiles(density):
        gate = None if density is None else jnp.asarray(np.where(keep < density, 0.0, -np.inf), jnp.float32)
        count, _ = xla.tiles_computed(q[:B], k[:B], v[:B], key_log_gate=gate,
                                      local_window=None if gate is None else window, block_q=64, block_k=64)
        return int(count)

    dense = tiles(None)
    assert dense == 16 * 17 // 2
    assert tiles(0.1) < 0.4 * dense
    assert tiles(0.0) == 16 * 2 - 1  # the band alone: the diagonal block and the one before it
    assert dense <= tiles(1.0) <= dense + 16


def test_kv_block_ranges():
    def ranges(**kw):
        plan = _Plan(block_q=16, block_k=16, local_window=None, scale=1.0, **(dict(sliding_window=None) | kw))
        return [tuple(int(x) for x in plan.kv_block_range(i)) for i in range(plan.num_q_blocks)]

    assert ranges(t=64, s=64, causal=True) == [(0, 1), (0, 2), (0, 3), (0, 4)]
    # Window 20: query 32 reaches back to key 13, query 48 to key 29.
    assert ranges(t=64, s=64, causal=True, sliding_window=20) == [(0, 1), (0, 2), (0, 3), (1, 4)]
    assert ranges(t=64, s=64, causal=True, sliding_window=16) == [(0, 1), (0, 2), (1, 3), (2, 4)]
    # Bottom-right aligned: 16 queries at positions 48..63 of 64 keys.
    assert ranges(t=16, s=64, causal=True) == [(0, 4)]
    # 40 queries on 8 keys sit at positions -32..7: the first two query blocks see nothing.
    assert ranges(t=40, s=8, causal=True) == [(0, 0), (0, 0), (0, 1)]
    assert ranges(t=64, s=64, causal=False) == [(0, 4)] * 4


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(t=st.integers(1, 70), s=st.integers(1, 70), block_q=st.sampled_from([1, 8, 16]),
                  block_k=st.sampled_from([1, 8, 16]), causal=st.booleans(),
                  window=st.one_of(st.none(), st.integers(1, 40)))
def test_kv_block_range_is_the_span_of_visible_blocks(t, s, block_q, block_k, causal, window):
    causal = causal or window is not None
    plan = _Plan(t=t, s=s, block_q=block_q, block_k=block_k, causal=causal, sliding_window=window,
                 local_window=None, scale=1.0)
    rel = (s - t + np.arange(t))[:, None] - np.arange(s)[None, :]
    visible = np.ones((t, s), bool) if not causal else rel >= 0
    if window is not None:
        visible &= rel < window
    for i in range(plan.num_q_blocks):
        rows = visible[i * block_q:(i + 1) * block_q]
        blocks = np.flatnonzero(rows.any(0)) // block_k
        lo, hi = (int(x) for x in plan.kv_block_range(i))
        if blocks.size:
            assert (lo, hi) == (blocks.min(), blocks.max() + 1), f"query block {i}"
        else:
            assert lo == hi, f"query block {i} sees nothing but would loop over [{lo}, {hi})"


def test_no_score_matrix_is_materialised():
    T = 128
    q, k, v, gate, do = inputs(T, T, 2, 2)

    def loss(q, k, v, gate):
        o = softmax_attention_xla(q, k, v, key_log_gate=gate, local_window=8, block_q=32, block_k=32)
        return jnp.sum(o * do)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, gate)
    sizes = []

    def walk(jx):
        for eqn in jx.eqns:
            sizes.extend(math.prod(x.aval.shape) for x in eqn.outvars if hasattr(x.aval, "shape"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    full = B * 2 * T * T
    assert max(sizes) <= full // 4, f"largest intermediate has {max(sizes)} elements; B*H*T*S = {full}"


@pytest.mark.parametrize("impl, name", [(i, "mqa-gate-local-window") for i in ("xla", "pallas", "pallas-pipeline")]
                         + [(i, "v-is-k-sliding-window") for i in ("cudnn", "splash")])
def test_bf16_inputs_against_fp32_reference(impl, name):
    # bf16 keeps 8 significant bits (unit roundoff 2**-9 ~ 2e-3), and both fast forms round P and dS to
    # bf16 before their matmuls. Measured rel-RMSE, xla and pallas alike: o 1.8e-3, dq 3.1e-3, dk 2.9e-3,
    # dv 3.1e-3, gate 2.4e-3; the bf16 rounding of the outputs alone accounts for 1.5e-3 to 2.7e-3. Bound 1e-2.
    # The library kernels (no gate) on a gate-free case; cuDNN takes bf16 only and runs in the GPU suite.
    arrays, _ = case_arrays(name)
    as_bf16 = {x: arrays[x].astype(jnp.bfloat16) for x in ("q", "k", "v", "gate") if arrays[x] is not None}
    got = _run_case(impl, name, **as_bf16)
    want = _run_case("reference", name, **{x: a.astype(jnp.float32) for x, a in as_bf16.items()})
    assert all(x is None or x.dtype == jnp.bfloat16 for x in got)
    for what, a, e in zip(("o", "dq", "dk", "dv", "dgate"), got, want):
        if e is not None:
            assert_close(a, e, rel=1e-2, name=f"bf16 {what}")


# --- decode -------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
def test_decode_matches_reference_with_per_head_valid_keys(impl):
    S, Hq, Hkv = 40, 4, 2
    q, k, v, _, _ = inputs(1, S, Hq, Hkv, seed=3)
    valid = np.random.default_rng(4).random((B, S, Hkv)) < 0.6
    valid[1, :, 1] = False  # a head whose whole cache was pruned reads nothing
    valid = jnp.asarray(valid)
    # A 0 / -inf gate on every key is exactly a hard per-head key mask; with every key valid, decode is
    # the newest query of causal attention (bottom-right aligned).
    @jax.jit
    def both(valid):
        closed = jnp.where(valid, 0.0, -jnp.inf)
        return ((softmax_decode(q, k, v, valid, impl=impl),
                 softmax_attention_reference(q, k, v, causal=False, key_log_gate=closed)),
                (softmax_decode(q, k, v, jnp.ones_like(valid), scale=0.3, impl=impl),
                 softmax_attention_reference(q, k, v, causal=True, scale=0.3)))

    (o, want), (o_all, want_all) = both(valid)
    assert o.shape == (B, 1, Hq, DV)
    assert_close(o, want, rel=1e-6, name="decode")
    np.testing.assert_array_equal(np.asarray(o)[1, 0, 2:], 0.0)
    assert_close(o_all, want_all, rel=1e-6, name="decode, all keys valid")


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_decode_bf16_cache_against_fp32_reference(impl):
    """The fast decodes read a bf16 cache as bf16 (no fp32 copy) and still land within bf16 rounding."""
    S, Hq, Hkv = 40, 4, 1
    q, k, v, gate, _ = inputs(1, S, Hq, Hkv, seed=5)
    valid = jnp.asarray(np.random.default_rng(6).random((B, S, Hkv)) < 0.8)
    bf = lambda x: x.astype(jnp.bfloat16)
    got = softmax_decode(bf(q), bf(k), bf(v), valid, key_log_gate=gate, impl=impl)
    want = softmax_decode(*(bf(x).astype(jnp.float32) for x in (q, k, v)), valid, key_log_gate=gate,
                          impl="reference")
    assert got.dtype == jnp.bfloat16
    assert_close(got, want, rel=1e-2, name="bf16 decode")


def test_decode_argument_errors():
    q, k, v, _, _ = inputs(1, 8, 2, 1)
    with pytest.raises(ValueError, match="valid"):
        softmax_decode(q, k, v, jnp.ones((B, 8, 2), bool))
    with pytest.raises(ValueError, match="q must be"):
        softmax_decode(jnp.concatenate([q, q], axis=1), k, v, jnp.ones((B, 8, 1), bool))
    ok = jnp.ones((B, 8, 1), bool)
    with pytest.raises(ValueError, match="key_norm_scale must be"):
        softmax_decode(q, k, v, ok, key_norm_scale=jnp.ones(3))
    with pytest.raises(ValueError, match="key_rope_theta needs key_positions"):
        softmax_decode(q, k, v, ok, key_rope_theta=1e4)


def test_decode_refuses_malformed_pages():
    q, k, v, _, _ = inputs(1, 8, 2, 1)  # k [B, 8, 1, 16]
    pool, pool_v = jnp.zeros((3, 4, k.shape[-1])), jnp.zeros((3, 4, v.shape[-1]))
    good = KeyPages(pool, pool_v, jnp.zeros((B, 1, 2), jnp.int32), jnp.zeros((B, 1), jnp.int32))
    for bad, says in ((good._replace(k=pool[..., :3]), "pages.k must be"),
                      (good._replace(v=pool_v[:2]), "pages.v must be"),
                      (good._replace(k=pool.astype(jnp.bfloat16)), "dense cache's dtypes"),
                      (good._replace(table=jnp.zeros((B, 2, 2), jnp.int32)), "pages.table must be"),
                      (good._replace(table=jnp.zeros((B, 1, 2))), "pages.table must be integers"),
                      (good._replace(lengths=jnp.zeros((B,), jnp.int32)), "pages.lengths must be"),
                      (good._replace(positions=jnp.zeros((3, 5), jnp.int32)), "pages.positions must be")):
        with pytest.raises(ValueError, match=says):
            softmax_decode(q, k, v, pages=bad)
    with pytest.raises(ValueError, match="pages.positions"):
        softmax_decode(q, k, v, pages=good, key_rope_theta=1e4,
                       key_positions=jnp.zeros(k.shape[:3], jnp.int32))


# --- public op: validation and dispatch ----------------------------------------------------------

_q, _k, _v, _gate, _ = inputs(8, 8, 4, 2)
BAD_CALLS = {
    "q rank": (dict(q=_q[0]), "q must be"),
    "empty time": (dict(q=_q[:, :0]), "at least one time step"),
    "batch": (dict(k=_k[:1], v=_v[:1]), "batch"),
    "head dim": (dict(k=_k[..., :4]), "head dim"),
    "v shape": (dict(v=_v[:, :4]), "v shape"),
    "heads": (dict(q=_q[:, :, :3]), "multiple of k/v heads"),
    "causal type": (dict(causal=1), "causal"),
    "sliding_window value": (dict(sliding_window=0), "sliding_window"),
    "sliding_window non-causal": (dict(sliding_window=4, causal=False), "sliding_window requires causal"),
    "local_window value": (dict(local_window=-1, key_log_gate=_gate), "local_window"),
    "local_window without gate": (dict(local_window=4), "local_window"),
    "gate shape": (dict(key_log_gate=_gate[:, :, :1]), "key_log_gate"),
    "segment shape": (dict(segment_ids=jnp.zeros((B, 7), jnp.int32)), "segment_ids"),
    "segment T != S": (dict(q=_q[:, :4], segment_ids=jnp.zeros((B, 4), jnp.int32)), "same length"),
    "segment dtype": (dict(segment_ids=jnp.zeros((B, 8))), "integers"),
    "scale type": (dict(scale=jnp.float32(0.5)), "scale"),
    "impl": (dict(impl="fast"), "impl"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_argument_errors(case):
    override, match = BAD_CALLS[case]
    kw = dict(q=_q, k=_k, v=_v) | override
    with pytest.raises(ValueError, match=match):
        softmax_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), **kw)


_PLAIN = dict(dtype=jnp.dtype(jnp.bfloat16), q_shape=(1, 256, 8, 128), k_shape=(1, 256, 2, 128),
              v_shape=(1, 256, 2, 128), causal=True, sliding_window=None, local_window=None, has_key_log_gate=False,
              has_segment_ids=False, kv_shared=False)


def _auto_on(backend, **change):
    """auto's choice for a call on `backend`, with the library kernels' own supports checks."""
    from attention.ops.softmax import auto, library
    info = _PLAIN | change
    why_not = {"pallas": None, "cudnn": library.cudnn_supports(backend=backend, **info),
               "splash": library.splash_supports(backend=backend, **info)}
    return auto.choose(backend=backend, why_not=why_not, **info)


def test_auto_takes_a_library_kernel_for_plain_calls_and_ours_for_what_only_it_does():
    assert _auto_on("gpu")[0] == "cudnn" and "unmeasured" in _auto_on("gpu")[1]
    assert _auto_on("tpu")[0] == "splash"
    assert _auto_on("gpu", sliding_window=128)[0] == "cudnn"
    assert _auto_on("tpu", has_segment_ids=True)[0] == "splash"
    for backend in ("gpu", "tpu"):
        impl, why = _auto_on(backend, has_key_log_gate=True, local_window=64)
        assert impl == "pallas" and "SP-KV gate" in why
        impl, why = _auto_on(backend, kv_shared=True)
        assert impl == "pallas" and "once" in why
    # What cuDNN refuses falls to our kernel, and the reason says why cuDNN was not taken.
    impl, why = _auto_on("gpu", dtype=jnp.dtype(jnp.float32))
    assert impl == "pallas" and "not cudnn: cuDNN's fused attention takes bfloat16 or float16" in why
    impl, why = _auto_on("gpu", has_segment_ids=True)
    assert impl == "pallas" and "packed-document" in why
    assert _auto_on("cpu") == ("xla", "on the CPU Pallas kernels run only interpreted (for tests); xla is faster")


def test_library_kernels_say_what_they_do_not_serve():
    from attention.ops.softmax.library import cudnn_supports, splash_supports

    assert cudnn_supports(backend="gpu", **_PLAIN) is None and splash_supports(backend="tpu", **_PLAIN) is None
    assert "NVIDIA GPUs only" in cudnn_supports(backend="tpu", **_PLAIN)
    assert "TPU kernel" in splash_supports(backend="gpu", **_PLAIN)
    assert "top-left" in cudnn_supports(backend="gpu", **_PLAIN | dict(q_shape=(1, 128, 8, 128)))
    assert "multiples of 8 up to" in cudnn_supports(backend="gpu", **_PLAIN | dict(
        q_shape=(1, 256, 8, 100), k_shape=(1, 256, 2, 100), v_shape=(1, 256, 2, 100)))
    gated = _PLAIN | dict(has_key_log_gate=True)
    assert "gate" in cudnn_supports(backend="gpu", **gated) and "gate" in splash_supports(backend="tpu", **gated)
    assert "see no key" in splash_supports(backend="tpu", **_PLAIN | dict(q_shape=(1, 512, 8, 128)))
    with pytest.raises(dispatch.ImplUnavailable, match="impl='cudnn' cannot run here: cuDNN attention runs on"):
        softmax_attention(_q, _k, _v, impl="cudnn")


def test_auto_records_its_choice_and_reason():
    # fp32: xla on the CPU, our kernel on a GPU (cuDNN takes bf16/fp16 only), splash on a TPU.
    dispatch.clear_choices()

    @jax.jit
    def both(q, k, v):
        with dispatch.label_calls("layer0.softmax"):
            auto = softmax_attention(q, k, v, impl="auto")
        return auto, softmax_attention(q, k, v, impl="reference")

    auto, ref = both(_q, _k, _v)
    recorded = dict(dispatch.choices())["layer0.softmax"]
    chosen, says = {"cpu": ("xla", "interpreted"), "gpu": ("pallas", "not cudnn"),
                    "tpu": ("splash", "splash")}[jax.default_backend()]
    assert (recorded.op, recorded.requested, recorded.chosen) == ("softmax_attention", "auto", chosen)
    assert says in recorded.reason
    assert_close(auto, ref, rel=1e-5, name="auto")
