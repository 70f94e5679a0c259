"""Parity cases of `softmax_decode`: one new query token per sequence against a KV cache whose keys are
valid per KV head (a pruned SP-KV cache), every registered implementation against the dense reference."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attention.ops import dispatch
from tests.numerics import assert_close

OP = "softmax_decode"
B, D, DV = 2, 16, 32  # powers of two >= 16, as the decode kernel needs on a GPU; D != DV

# S: cache length; Hq, Hkv: heads; keep: share of valid cache entries; gate: a key_log_gate; v_is_k: the
# cache holds one array as keys and values (K=V sharing).
# Options an implementation takes in tests only: small key tiles and several splits of the cache; heads
# sharing a block (the TPU layout for narrow heads) in one case.
TEST_OPTIONS = {"pallas": dict(block_k=16, splits=3)}
CASE_OPTIONS = {"gqa-pruned-one-head-empty": {"pallas": dict(heads_per_block=2)}}

CASES = {
    "gqa-pruned-one-head-empty": dict(S=40, Hq=4, Hkv=2, keep=0.6, empty_head=True),
    "mqa-gate": dict(S=37, Hq=4, Hkv=1, keep=0.8, gate=True),
    "mha-v-is-k-full": dict(S=16, Hq=2, Hkv=2, keep=1.0, v_is_k=True),
}


def case_arrays(case):
    c = CASES[case]
    rng = np.random.default_rng(len(case))
    S, Hq, Hkv = c["S"], c["Hq"], c["Hkv"]
    q = jnp.asarray(rng.standard_normal((B, 1, Hq, D), np.float32))
    k = jnp.asarray(rng.standard_normal((B, S, Hkv, D), np.float32))
    v = k if c.get("v_is_k") else jnp.asarray(rng.standard_normal((B, S, Hkv, DV), np.float32))
    valid = rng.random((B, S, Hkv)) < c["keep"]
    if c.get("empty_head"):
        valid[1, :, 1] = False
    gate = jnp.asarray(-np.logaddexp(0.0, -3.0 * rng.standard_normal((B, S, Hkv))), jnp.float32) \
        if c.get("gate") else None
    return q, k, v, jnp.asarray(valid), gate


@functools.partial(jax.jit, static_argnames=("fn", "v_is_k", "opts"))
def _run(fn, q, k, v, valid, gate, v_is_k=False, opts=()):
    # K=V passes k itself as v inside the trace (two jit arguments would be two tracers).
    return fn(q, k, k if v_is_k else v, valid, key_log_gate=gate, **dict(opts))


def run(impl, case):
    opts = TEST_OPTIONS.get(impl, {}) | CASE_OPTIONS.get(case, {}).get(impl, {})
    return _run(dispatch.implementations(OP)[impl], *case_arrays(case), v_is_k=CASES[case].get("v_is_k", False),
                opts=tuple(sorted(opts.items())))


def compare(got, want, case):
    assert_close(got, want, rel=1e-5, name=f"{case} o")
    if CASES[case].get("empty_head"):
        np.testing.assert_array_equal(np.asarray(got)[1, 0, 2:], 0.0, err_msg="a head with no valid key reads 0")
