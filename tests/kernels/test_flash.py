"""The flash kernel beyond the parity table (tests/kernels/softmax_cases.py, which runs it through dispatch at
16x16 tiles): its loop bounds are exactly the visible tiles, forward and backward, and it is right at the
per-target default tiles and a realistic head dim."""
from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from attention.ops.softmax.reference import softmax_attention_reference
from kernels_pallas import platform
from kernels_pallas.flash import BLOCKS, flash_attention
from kernels_pallas.flash.tiles import Plan
from tests.numerics import assert_close


def _plan(t, s, block_q, block_k, causal, window):
    pad = lambda n, b: -(-n // b) * b  # noqa: E731
    return Plan(t=t, s=s, t_pad=pad(t, block_q), s_pad=pad(s, block_k), block_q=block_q, block_k=block_k,
                group=1, scale=1.0, causal=causal, sliding_window=window, local_window=None, has_gate=False,
                has_segments=False, kv_shared=False, interpret=True, num_warps=4, num_stages=2)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(t=st.integers(1, 70), s=st.integers(1, 70), block_q=st.sampled_from([1, 8, 16]),
                  block_k=st.sampled_from([1, 8, 16]), causal=st.booleans(),
                  window=st.one_of(st.none(), st.integers(1, 40)))
def test_loop_bounds_are_the_span_of_visible_tiles(t, s, block_q, block_k, causal, window):
    """kv_range (forward, dq) and q_range (dk/dv) each cover exactly the tiles with a visible pair: a missing
    tile is a wrong result, an extra one wasted work."""
    causal = causal or window is not None
    plan = _plan(t, s, block_q, block_k, causal, window)
    rel = (s - t + np.arange(t))[:, None] - np.arange(s)[None, :]
    visible = np.ones((t, s), bool) if not causal else rel >= 0
    if window is not None:
        visible &= rel < window

    def check(seen_mask, bounds, block, what):
        seen = np.flatnonzero(seen_mask) // block
        lo, hi = (int(x) for x in bounds)
        if seen.size:
            assert (lo, hi) == (seen.min(), seen.max() + 1), what
        else:
            assert lo == hi, f"{what} sees nothing but would loop over [{lo}, {hi})"

    for i in range(plan.num_q_blocks):
        check(visible[i * block_q:(i + 1) * block_q].any(0), plan.kv_range(i), block_k, f"query block {i}")
    for j in range(plan.num_k_blocks):
        check(visible[:, j * block_k:(j + 1) * block_k].any(1), plan.q_range(j), block_q, f"key block {j}")


def test_default_tiles_and_head_dim_64():
    """The CPU table's own tiles (several per axis at T=300), GQA 4, gate and window, fp32 against the oracle."""
    bq, bk = BLOCKS["cpu"][:2]
    T, Hq, Hkv, D = 300, 4, 1, 64
    assert T > 2 * max(bq, bk)
    rng = np.random.default_rng(1)
    q, k, v, do = (jnp.asarray(rng.standard_normal(sh, np.float32)) for sh in
                   ((1, T, Hq, D), (1, T, Hkv, D), (1, T, Hkv, D), (1, T, Hq, D)))
    gate = jnp.asarray(-np.abs(rng.standard_normal((1, T, Hkv))).astype(np.float32))
    opts = dict(sliding_window=200, local_window=32, key_log_gate=gate)

    def grads(fn):
        o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **opts), q, k, v)
        return (o, *vjp(do))

    got = jax.jit(lambda: grads(flash_attention))()
    want = jax.jit(lambda: grads(softmax_attention_reference))()
    for what, a, e in zip(("o", "dq", "dk", "dv"), got, want):
        assert_close(a, e, rel=1e-5, name=what)


def _pallas_operands(fn, *args):
    """Operand shapes of every pallas_call in fn's program (forward and, under grad, backward)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                found.append([tuple(x.aval.shape) for x in eqn.invars])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    # Traced for the CPU target on any machine, so the shapes are the unpadded ones.
    with platform.targeting("cpu"):
        walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_k_equals_v_is_one_operand_in_every_kernel():
    """One array as key and value: every kernel (forward, dq, dk/dv, decode) takes it once, so each tile
    is loaded once; separate k and v are two operands."""
    from attention.ops.softmax.pallas import softmax_attention_pallas, softmax_decode_pallas

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 32, 4, 8), np.float32))
    k = jnp.asarray(rng.standard_normal((1, 32, 2, 8), np.float32))
    v = k + 1.0

    def train(q, k, v):
        return jax.grad(lambda q, k, v: softmax_attention_pallas(q, k, v).sum(), argnums=(0, 1, 2))(q, k, v)

    def train_shared(q, k):
        return jax.grad(lambda q, k: softmax_attention_pallas(q, k, k).sum(), argnums=(0, 1))(q, k)

    def count(calls):  # operands shaped as k or v, heads first: [B, Hkv, S, D]
        return [c.count((1, 2, 32, 8)) for c in calls]

    assert count(_pallas_operands(train_shared, q, k)) == [1, 1, 1]
    assert count(_pallas_operands(train, q, k, v)) == [2, 2, 2]
    valid = jnp.ones((1, 32, 2), bool)
    flat = (1, 32, 16)  # the cache viewed as [B, S, Hkv * D]
    decode_shared = _pallas_operands(lambda q, k: softmax_decode_pallas(q, k, k, valid), q[:, :1], k)
    decode_split = _pallas_operands(lambda q, k, v: softmax_decode_pallas(q, k, v, valid), q[:, :1], k, v)
    assert [c.count(flat) for c in decode_shared] == [1]
    assert [c.count(flat) for c in decode_split] == [2]


def test_decode_on_a_gpu_refuses_head_dims_it_cannot_read_in_place():
    from attention.ops.softmax.pallas import supports_decode

    call = dict(dtype=jnp.bfloat16, q_shape=(1, 1, 8, 24), has_key_log_gate=False)
    assert supports_decode(backend="gpu", k_shape=(1, 64, 2, 64), v_shape=(1, 64, 2, 128), **call) is None
    assert "power-of-two head dims >= 16; got 24 (keys)" in supports_decode(
        backend="gpu", k_shape=(1, 64, 2, 24), v_shape=(1, 64, 2, 24), **call)
    # Interpreted on the CPU and on a TPU (blocks span the heads' columns) any head dim is read in place.
    for backend in ("cpu", "tpu"):
        assert supports_decode(backend=backend, k_shape=(1, 64, 2, 24), v_shape=(1, 64, 2, 24), **call) is None
    assert "not int32" in supports_decode(backend="gpu", dtype=jnp.int32, k_shape=(1, 64, 2, 64),
                                          v_shape=(1, 64, 2, 64), q_shape=(1, 1, 8, 64))


def test_k_equals_v_decode_with_rope_and_norm_is_still_one_operand():
    """The paper's Q-K=V with RoPE and qk-norm: the cache holds the raw projection and the kernel derives the
    keys per tile, so the cache is still one operand (no rotated copy written and read again)."""
    from attention.ops.softmax.pallas import softmax_decode_pallas

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 1, 4, 8), np.float32))
    k = jnp.asarray(rng.standard_normal((1, 32, 2, 8), np.float32))
    valid, pos = jnp.ones((1, 32, 2), bool), jnp.zeros((1, 32, 2), jnp.int32)

    def decode(q, k):
        return softmax_decode_pallas(q, k, k, valid, key_norm_scale=jnp.ones(8), key_rope_theta=1e4,
                                     key_positions=pos)

    calls = _pallas_operands(decode, q, k)
    assert [c.count((1, 32, 16)) for c in calls] == [1]
