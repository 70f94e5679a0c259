"""Parity cases of `softmax_attention`: every registered implementation against the dense reference, on the
output and the gradients of q, k, v and key_log_gate (fp32, 1e-5 relative).

Compilation dominates the run time, so each case combines several features; tests that need special inputs
(NaN poison, closed gates, bf16's fp32 oracle) reuse a case's shapes and options through `run(..., **replace)`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import pytest

from attention.ops import dispatch
from attention.ops.softmax.api import call_info
from tests.numerics import assert_close

OP = "softmax_attention"
OUTPUTS = ("o", "dq", "dk", "dv", "dgate")
# Options an implementation takes in tests only: small tiles, so every case spans several query and key
# blocks and the tile-skipping paths run.
TEST_OPTIONS = {"xla": dict(block_q=16, block_k=16), "pallas": dict(block_q=16, block_k=16),
                "splash": dict(block=128)}
# Library kernels serve only some cases (and backends); the others skip, naming why.
LIBRARY = ("cudnn", "splash")
# Other builds of a registered implementation that tests run by name: the flash kernel's TPU pipeline driver,
# interpreted on any backend (the pallas entry is its portable row driver).
VARIANTS = {"pallas-pipeline": ("pallas", dict(block_q=16, block_k=16, driver="pipeline", interpret=True))}


@functools.cache
def implementations() -> dict:
    """Every registered implementation with its test options bound, and the VARIANTS (one object each, so jit
    caches hold)."""
    impls = dispatch.implementations(OP)
    table = {impl: functools.partial(fn, **TEST_OPTIONS.get(impl, {})) for impl, fn in impls.items()}
    return table | {name: functools.partial(impls[base], **opts) for name, (base, opts) in VARIANTS.items()}


B, D, DV = 2, 8, 6  # D != DV so that a swapped v/k axis cannot pass


def inputs(T, S, Hq, Hkv, *, share_kv=False, seed=0):
    """q, k, v, key_log_gate, do as fp32. numpy draws: jax.random would compile for every new shape."""
    rng = np.random.default_rng(seed)
    dv = D if share_kv else DV
    q, k, v, do = (rng.standard_normal(shape, np.float32) for shape in
                   ((B, T, Hq, D), (B, S, Hkv, D), (B, S, Hkv, DV), (B, T, Hq, dv)))
    # log-sigmoid of wide logits, from about 0 to about -10, and every 7th key strongly closed.
    gate = -np.logaddexp(0.0, -3.0 * rng.standard_normal((B, S, Hkv))).astype(np.float32)
    gate[:, ::7] = -40.0
    return tuple(jnp.asarray(x) for x in (q, k, v, gate, do))


def _segments(T, starts_per_row):
    """segment_ids [B,T] whose documents start at the given positions; ids alternate 0/1, so a reused
    id must still count as a new document."""
    ids = np.zeros((len(starts_per_row), T), np.int32)
    for b, starts in enumerate(starts_per_row):
        for n, s in enumerate(starts):
            ids[b, s:] = (n + 1) % 2
    return jnp.asarray(ids)


@functools.partial(jax.jit, static_argnames=("fn", "share_kv", "opts"))
def _run(fn, q, k, v, gate, do, segment_ids=None, *, share_kv=False, opts=()):
    """Output and the gradients of <o, do> w.r.t. q, k, v (None when v is k) and the gate."""

    def f(q, k, v, gate):
        return fn(q, k, k if share_kv else v, key_log_gate=gate, segment_ids=segment_ids, **dict(opts))

    o, vjp = jax.vjp(f, q, k, v, gate)
    dq, dk, dv, dgate = vjp(do.astype(o.dtype))
    return o, dq, dk, None if share_kv else dv, None if gate is None else dgate


# T, S, Hq, Hkv; gate; segment starts per batch row; v is k; the op's keyword options.
CASES = {
    # Logits of a few hundred: exp without the running max would overflow fp32.
    "causal-mha-large-logits": dict(T=64, S=64, Hq=2, Hkv=2, scale=12.0),
    "noncausal-gqa4-ragged-T<S": dict(T=77, S=130, Hq=8, Hkv=2, causal=False),
    "mqa-gate-local-window": dict(T=77, S=77, Hq=4, Hkv=1, gate=True, local_window=24),
    "v-is-k-sliding-window": dict(T=77, S=77, Hq=4, Hkv=2, share_kv=True, sliding_window=20),
    "segments-gate-everywhere": dict(T=77, S=77, Hq=4, Hkv=2, gate=True,
                                     segments=[[0, 5, 40, 41, 70], [0, 33]]),
    "all-masks-v-is-k": dict(T=77, S=77, Hq=4, Hkv=1, segments=[[0, 30], [0, 18, 60]], sliding_window=24,
                             gate=True, local_window=8, share_kv=True),
    "T<S-window-gate": dict(T=24, S=70, Hq=2, Hkv=2, sliding_window=30, gate=True, local_window=10),
    # Bottom-right aligned, the first 16 queries precede every key: rows with nothing to see.
    "T>S-gate-local0": dict(T=40, S=24, Hq=2, Hkv=1, gate=True, local_window=0),
    # Documents and a window without a gate: what splash serves of the packed-document cases.
    "segments-gqa-window": dict(T=77, S=77, Hq=4, Hkv=2, sliding_window=40, segments=[[0, 20, 50], [0, 64]]),
    # SP-KV's hard gate (0 or -inf; about 30% of the keys kept, per kv head): what compact keys serve.
    "hard-gate-gqa-window-segments": dict(T=77, S=77, Hq=4, Hkv=2, gate="hard", local_window=12,
                                          sliding_window=50, segments=[[0, 30], [0, 50]]),
    "T<S-hard-gate-v-is-k": dict(T=40, S=90, Hq=2, Hkv=1, gate="hard", local_window=16, share_kv=True),
}


def case_arrays(name, **replace):
    """Inputs and `_run` arguments of a case; `replace` swaps in other q/k/v/gate arrays."""
    c = dict(CASES[name])
    T, S, Hq, Hkv = (c.pop(x) for x in ("T", "S", "Hq", "Hkv"))
    gate, segments, share_kv = c.pop("gate", False), c.pop("segments", None), c.pop("share_kv", False)
    q, k, v, g, do = inputs(T, S, Hq, Hkv, share_kv=share_kv)
    if gate == "hard":
        g = jnp.where(g > -0.2, 0.0, -jnp.inf)
    arrays = dict(q=q, k=k, v=v, gate=g if gate else None, do=do,
                  segment_ids=None if segments is None else _segments(T, segments)) | replace
    return arrays, dict(share_kv=share_kv, opts=tuple(sorted(c.items())))


def run(impl, name, **replace):
    """(o, dq, dk, dv, dgate) of case `name` through implementation `impl` (with its test options);
    `replace` swaps in other q/k/v/gate arrays. A library kernel that does not serve the case (or runs only on
    another backend) skips the test, naming why."""
    arrays, static = case_arrays(name, **replace)
    base = VARIANTS.get(impl, (impl,))[0]
    options = dict(static["opts"])
    info = call_info(arrays["q"], arrays["k"], arrays["k"] if static["share_kv"] else arrays["v"],
                     causal=options.get("causal", True), sliding_window=options.get("sliding_window"),
                     local_window=options.get("local_window"), key_log_gate=arrays["gate"],
                     segment_ids=arrays["segment_ids"])
    why = dispatch.why_not(OP, base, **info) if base in LIBRARY else None
    if why is not None:
        pytest.skip(f"{impl} does not serve {name}: {why}")
    return _run(implementations()[impl], **arrays, **static)


def compare(got, want, name):
    for what, a, e in zip(OUTPUTS, got, want):
        if e is not None:
            assert_close(a, e, rel=1e-5, name=f"{name} {what}")
