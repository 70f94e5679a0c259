"""Parity cases of `lightning`: every registered implementation against the token-by-token reference, on the
output, the final state and the gradients of q, k, v, log_decay and the initial state (fp32, 1e-5 relative).

`block` in a case is the block length a blocked implementation uses (small, so T = 50 spans several blocks,
ragged); the implementations' test options turn it into their own argument.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attention.ops import dispatch
from tests.numerics import assert_close

OP = "lightning"
# One head that never decays, one slow, one fast, one so fast that exp(-8 * block) underflows and
# any exp(+lambda t) factoring would overflow within a dozen tokens.
DECAYS = (0.0, -0.01, -1.0, -8.0)
B, H, K, V = 2, len(DECAYS), 8, 6  # K != V so that a swapped state axis cannot pass


def inputs(T, seed=0, dtype=jnp.float32):
    # numpy draws: jax.random would compile a threefry kernel per shape, seconds each on CPU
    rng = np.random.default_rng(seed)

    def normal(shape, dt=jnp.float32):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dt)

    q, k = normal((B, T, H, K), dtype), normal((B, T, H, K), dtype)
    v = normal((B, T, H, V), dtype)
    return q, k, v, normal((B, H, K, V)), normal((B, T, H, V)), normal((B, H, K, V))


def segments(T, starts_per_row):
    """segment_ids [B,T] whose documents start at the given positions (ids need not be unique)."""
    rows = []
    for starts in starts_per_row:
        ids = np.zeros(T, np.int32)
        for n, s in enumerate(starts):
            ids[s:] = (n + 1) % 2  # alternating ids: a reused id is still a new document
        rows.append(ids)
    return jnp.asarray(np.stack(rows))


# Per implementation: case -> keyword options for the call (tests only).
def _kernel_chunk(block: int) -> int:
    """The case's block as a kernel chunk: any length interpreted on the CPU; Triton and Mosaic need powers of
    two of at least 16."""
    return block if jax.default_backend() == "cpu" else max(16, 1 << max(0, (block - 1).bit_length()))


TEST_OPTIONS = {"xla": lambda c: dict(block=c["block"]), "pallas": lambda c: dict(chunk=_kernel_chunk(c["block"]))}


@functools.partial(jax.jit, static_argnames=("fn", "opts"))
def run_fn(fn, q, k, v, log_decay, h0, do, dS, segment_ids=None, opts=()):
    """Outputs, final state and the gradients of <o,do> + <S,dS> w.r.t. q, k, v, log_decay, h0.
    Module-level jit, so cases of one shape share the reference's compilation."""
    kw = dict(opts)

    def f(q, k, v, log_decay, h0):
        return fn(q, k, v, log_decay, initial_state=h0, output_final_state=True, segment_ids=segment_ids, **kw)

    (o, S), vjp = jax.vjp(f, q, k, v, log_decay, h0)
    return o, S, vjp((do.astype(o.dtype), dS))


T_CASES = 50
CASES = {
    # T ragged w.r.t. the block, with and without an initial state
    "ragged": dict(block=16, h0=True),
    "ragged_no_h0": dict(block=16, h0=False),
    "single_block": dict(block=64, h0=True),
    "whole_blocks": dict(block=10, h0=False),
    "block_1": dict(block=1, h0=True),
    # documents starting inside blocks (5, 21, 40), at block boundaries (16, 32), at the last
    # token (49), and a row with one document; ids alternate, so equal ids recur
    "segments": dict(block=16, h0=True, starts=[[5, 16, 21, 32, 40, 49], []]),
    "segments_at_boundaries": dict(block=10, h0=False, starts=[[10, 20, 40], [1, 49]]),
    # a decode step (one token from a state) and a sequence shorter than a block
    "one_token": dict(block=16, h0=True, T=1),
    "short": dict(block=16, h0=True, T=5, starts=[[3], []]),
}


def case_arrays(case):
    """(q, k, v, log_decay, h0, do, dS, segment_ids) of a case."""
    c = CASES[case]
    T = c.get("T", T_CASES)
    q, k, v, h0, do, dS = inputs(T, seed=len(case))
    seg = segments(T, c["starts"]) if "starts" in c else None
    return q, k, v, jnp.array(DECAYS), h0 if c["h0"] else None, do, dS, seg


def run(impl, case):
    """(o, final state, grads) of a case through `impl` with its test options."""
    opts = TEST_OPTIONS.get(impl, lambda c: {})(CASES[case])
    *arrays, seg = case_arrays(case)
    return run_fn(dispatch.implementations(OP)[impl], *arrays, segment_ids=seg, opts=tuple(sorted(opts.items())))


def compare(got, want, case):
    assert_close(got[0], want[0], rel=1e-5, name=f"{case} o")
    assert_close(got[1], want[1], rel=1e-5, name=f"{case} final state")
    names = ["dq", "dk", "dv", "dlog_decay"] + (["dh0"] if CASES[case]["h0"] else [])
    for name, g, r in zip(names, got[2], want[2]):
        assert_close(g, r, rel=1e-5, name=f"{case} {name}")
