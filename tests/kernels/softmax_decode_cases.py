"""Parity cases of `softmax_decode`: one new query token per sequence against a KV cache whose keys are
valid per KV head, or held up to a length per KV head (a pruned cache, ragged across the batch), with or without a
paged store beside it (pages of a pool shared by the batch, a page table per pair), every registered
implementation against the dense reference. Slots past a head's length, pool pages no pair holds and page rows
past a pair's length hold NaN: an implementation that reads them fails."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attention.ops import dispatch
from attention.ops.softmax.api import KeyPages
from tests.numerics import assert_close

OP = "softmax_decode"
B, D, DV = 2, 16, 32  # powers of two >= 16, as the decode kernel needs on a GPU; D != DV

# S: cache length; Hq, Hkv: heads; keep: share of valid cache entries; gate: a key_log_gate; v_is_k: the
# cache holds one array as keys and values (K=V sharing); norm / rope: keys derived from the cache.
# lengths: per (sequence, KV head) held slots, valid: False to read by lengths alone.
# Options an implementation takes in tests only: small key tiles and several splits of the cache; heads
# sharing a block (the TPU layout for narrow heads), the TPU's scalar-prefetched lengths and xla's contraction
# on accelerators in some cases.
# pages: a paged store beside the cache: `page` slots a page, `lengths` per pair (the pool holds just enough pages
# for them, in a shuffled order, plus `spare` pages no pair holds); gate: a per-slot gate on the pages too.
TEST_OPTIONS = {"pallas": dict(block_k=16, splits=3), "xla": dict(block_k=16)}
CASE_OPTIONS = {"gqa-pruned-one-head-empty": {"pallas": dict(heads_per_block=2)},
                "gqa-lengths-prefetched": {"pallas": dict(prefetch=True, heads_per_block=2)},
                "gqa-paged-prefetched": {"pallas": dict(prefetch=True)},
                "gqa-v-is-k-norm-rope-paged": {"xla": dict(contraction="dot")},
                # xla's GPU/TPU contraction (dots) besides the CPU's (multiply and sum)
                "gqa-lengths-holes-gate": {"xla": dict(contraction="dot")},
                "gqa-v-is-k-norm-rope-pruned": {"xla": dict(contraction="dot")}}

CASES = {
    "gqa-pruned-one-head-empty": dict(S=40, Hq=4, Hkv=2, keep=0.6, empty_head=True),
    "mqa-gate": dict(S=37, Hq=4, Hkv=1, keep=0.8, gate=True),
    "mha-v-is-k-full": dict(S=16, Hq=2, Hkv=2, keep=1.0, v_is_k=True),
    # A K=V cache of raw shared projections: keys are normed and rotated at each slot's position (pruned caches
    # hold different positions per head; large positions make the angles large).
    "gqa-v-is-k-norm-rope-pruned": dict(S=45, Hq=4, Hkv=2, keep=0.7, v_is_k=True, norm=True, rope=True),
    "mqa-rope-gate": dict(S=33, Hq=4, Hkv=1, keep=0.9, gate=True, rope=True),
    # Held lengths, ragged over sequences and heads: empty, inside the first tile, mid-split, full.
    "gqa-lengths-ragged": dict(S=50, Hq=4, Hkv=2, keep=1.0, valid=False, lengths=[[0, 7], [33, 50]]),
    "gqa-lengths-prefetched": dict(S=50, Hq=4, Hkv=2, keep=1.0, valid=False, lengths=[[19, 0], [50, 2]]),
    "gqa-lengths-holes-gate": dict(S=41, Hq=4, Hkv=2, keep=0.7, gate=True, lengths=[[40, 17], [1, 41]]),
    "gqa-v-is-k-norm-rope-lengths": dict(S=45, Hq=4, Hkv=2, keep=1.0, valid=False, v_is_k=True, norm=True,
                                         rope=True, lengths=[[45, 30], [12, 3]]),
    # A pruned cache: a ring held up to a length per pair and a paged store, ragged over the pairs (no pages, a
    # part of one, several pages: blocks of pages in xla, several splits in the kernel; a pair holding nothing).
    "gqa-paged-ragged": dict(S=8, Hq=4, Hkv=2, keep=1.0, valid=False, lengths=[[8, 3], [8, 8]],
                             pages=dict(page=4, lengths=[[0, 3], [37, 21]], spare=2)),
    "gqa-paged-prefetched": dict(S=8, Hq=4, Hkv=2, keep=1.0, valid=False, lengths=[[8, 0], [5, 8]],
                                 pages=dict(page=8, lengths=[[17, 0], [40, 9]], spare=1)),
    "mqa-paged-gate": dict(S=6, Hq=4, Hkv=1, keep=1.0, valid=False, gate=True, lengths=[[6], [2]],
                           pages=dict(page=4, lengths=[[13], [30]], spare=0, gate=True)),
    "gqa-v-is-k-norm-rope-paged": dict(S=8, Hq=4, Hkv=2, keep=1.0, valid=False, v_is_k=True, norm=True, rope=True,
                                       lengths=[[8, 8], [4, 8]], pages=dict(page=4, lengths=[[25, 2], [11, 0]],
                                                                            spare=3)),
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
    lengths = None
    if "lengths" in c:
        lengths = np.asarray(c["lengths"], np.int32)
        past = np.arange(S)[None, :, None] >= lengths[:, None, :]
        k = jnp.where(past[..., None], jnp.nan, k)
        v = k if c.get("v_is_k") else jnp.where(past[..., None], jnp.nan, v)
        lengths = jnp.asarray(lengths)
    gate = jnp.asarray(-np.logaddexp(0.0, -3.0 * rng.standard_normal((B, S, Hkv))), jnp.float32) \
        if c.get("gate") else None
    transform = {}
    if c.get("norm"):
        transform |= dict(key_norm_scale=jnp.asarray(rng.uniform(0.5, 1.5, D), jnp.float32), key_norm_eps=1e-5)
    if c.get("rope"):
        transform |= dict(key_rope_theta=10000.0, key_positions=jnp.asarray(rng.integers(0, 50_000, (B, S, Hkv)),
                                                                         jnp.int32))
    if "pages" in c:
        transform["pages"] = paged_store(rng, Hkv, DV if not c.get("v_is_k") else D, rope=c.get("rope", False),
                                         **c["pages"])
    return q, k, v, jnp.asarray(valid) if c.get("valid", True) else None, lengths, gate, transform


def paged_store(rng, Hkv, dv, *, page, lengths, spare, gate=False, rope=False) -> KeyPages:
    """A pool holding each pair's `lengths` slots in whole pages, handed out in a shuffled order, and `spare`
    pages no pair holds. Rows past a pair's length and the spare pages hold NaN; table entries past a pair's
    pages are -1 (what a pruned cache leaves there)."""
    lengths = np.asarray(lengths, np.int32)
    need = -(-lengths // page)
    P, n = int(need.sum()) + spare, max(int(need.max()), 1)
    order = rng.permutation(P)
    table = np.full((B, Hkv, n), -1, np.int32)
    k = rng.standard_normal((P, page, D)).astype(np.float32)
    v = rng.standard_normal((P, page, dv)).astype(np.float32)
    held = np.zeros((P, page), bool)
    taken = 0
    for b in range(B):
        for h in range(Hkv):
            ids = order[taken:taken + need[b, h]]
            taken += need[b, h]
            table[b, h, :len(ids)] = ids
            rows = np.arange(len(ids) * page) < lengths[b, h]
            held[ids] = rows.reshape(len(ids), page)
    k[~held], v[~held] = np.nan, np.nan
    return KeyPages(jnp.asarray(k), jnp.asarray(v), jnp.asarray(table), jnp.asarray(lengths),
                    jnp.asarray(rng.integers(0, 50_000, (P, page)), jnp.int32) if rope else None,
                    jnp.asarray(-np.logaddexp(0.0, -3.0 * rng.standard_normal((P, page))), jnp.float32)
                    if gate else None)


@functools.partial(jax.jit, static_argnames=("fn", "v_is_k", "opts"))
def _run(fn, q, k, v, valid, lengths, gate, transform, v_is_k=False, opts=()):
    # K=V passes k itself as v inside the trace (two jit arguments would be two tracers), for the pages too. The
    # transform's numbers (theta, eps) are static options, its arrays arguments.
    pages = transform.get("pages")
    if pages is not None and v_is_k:
        transform = {**transform, "pages": pages._replace(v=pages.k)}
    return fn(q, k, k if v_is_k else v, valid, lengths=lengths, key_log_gate=gate, **transform, **dict(opts))


def run(impl, case):
    *arrays, transform = case_arrays(case)
    numbers = {name: x for name, x in transform.items() if isinstance(x, float)}
    opts = TEST_OPTIONS.get(impl, {}) | CASE_OPTIONS.get(case, {}).get(impl, {}) | numbers
    return _run(dispatch.implementations(OP)[impl], *arrays, {n: x for n, x in transform.items() if n not in numbers},
                v_is_k=CASES[case].get("v_is_k", False), opts=tuple(sorted(opts.items())))


def compare(got, want, case):
    assert_close(got, want, rel=1e-5, name=f"{case} o")
    if CASES[case].get("empty_head"):
        np.testing.assert_array_equal(np.asarray(got)[1, 0, 2:], 0.0, err_msg="a head with no valid key reads 0")
    held = np.asarray(CASES[case].get("lengths", [[1]])) + np.asarray(CASES[case].get("pages", {}).get("lengths", 0))
    for b, h in zip(*np.nonzero(held == 0)):
        G = CASES[case]["Hq"] // CASES[case]["Hkv"]
        np.testing.assert_array_equal(np.asarray(got)[b, 0, h * G:(h + 1) * G], 0.0, err_msg="an empty head reads 0")
