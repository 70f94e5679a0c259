"""The flash kernel beyond the parity table (tests/kernels/softmax_cases.py, which runs it through dispatch at
16x16 tiles): its loop bounds are exactly the visible tiles, forward and backward, and it is right at the
per-target default tiles and a realistic head dim; the TPU pipeline driver on every parity case (generic
interpret, and the TPU interpreter on one), its tile kinds and block lists against brute force, and its TPU
lowering."""
from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from attention.ops.softmax.api import documents
from attention.ops.softmax.reference import softmax_attention_reference
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import catalog, platform
from kernels_pallas.flash import BLOCKS, blocks, compact, flash_attention, pipeline
from kernels_pallas.flash.tiles import Plan
from tests.kernels import softmax_cases
from tests.numerics import assert_close


def _plan(t, s, block_q, block_k, causal, window, local_window=None, has_gate=False, has_segments=False):
    pad = lambda n, b: -(-n // b) * b  # noqa: E731
    return Plan(t=t, s=s, t_pad=pad(t, block_q), s_pad=pad(s, block_k), block_q=block_q, block_k=block_k,
                group=1, scale=1.0, causal=causal, sliding_window=window, local_window=local_window,
                has_gate=has_gate, has_segments=has_segments, kv_shared=False, interpret=True,
                launch=((4, 2),) * 3, pipeline=False)


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

    def count(calls):  # operands shaped as k or v, read in place: [B, S, Hkv, D]
        return [c.count((1, 32, 2, 8)) for c in calls]

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


# --- the TPU pipeline driver ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(softmax_cases.CASES))
def test_pipeline_matches_reference(name):
    """Output and every gradient of each parity case through the pipeline, interpreted (generic)."""
    softmax_cases.compare(jax.device_get(softmax_cases.run("pallas-pipeline", name)),
                          jax.device_get(softmax_cases.run("reference", name)), name)


def test_pipeline_under_the_tpu_interpreter():
    """The TPU interpreter runs the kernels with TPU semantics (scalar prefetch in SMEM, VMEM scratch, the
    sequential grid axes) and raises on an out-of-bounds read; about 10x slower, so one small case: a gate
    with local window 0, MQA, 40 queries on 24 keys (not whole blocks; the first 16 see no key)."""
    name = "T>S-gate-local0"
    arrays, static = softmax_cases.case_arrays(name)
    fn = functools.partial(softmax_cases.implementations()["pallas-pipeline"], interpret=pltpu.InterpretParams())
    got = jax.device_get(softmax_cases._run(fn, **arrays, **static))
    softmax_cases.compare(got, jax.device_get(softmax_cases.run("reference", name)), name)


def test_tpu_decode_splits_a_long_cache_into_bounded_blocks(monkeypatch):
    """On TPU a decode split is one VMEM block, so a cache longer than the cap is cut into more splits, not larger
    ones. With the cap lowered to 256 keys, 1100 keys held up to per-head lengths run as 5 splits under the TPU
    interpreter and equal softmax over the held keys."""
    from kernels_pallas.flash import decode

    monkeypatch.setattr(decode, "TPU_SPLIT_KEYS", 256)
    rng = np.random.default_rng(0)
    B, S, Hq, Hkv, D = 1, 1100, 4, 2, 128
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in
               ((B, 1, Hq, D), (B, S, Hkv, D), (B, S, Hkv, D)))
    lengths = np.array([[1100, 700]], np.int32)
    with platform.targeting("tpu"):
        lowered = jax.jit(functools.partial(decode.flash_decode, interpret=pltpu.InterpretParams())).trace(
            q, k, v, None, lengths=lengths).jaxpr
        got = decode.flash_decode(q, k, v, None, lengths=lengths, interpret=pltpu.InterpretParams())
    grids = [e.params["grid_mapping"].grid for e in lowered.eqns if e.primitive.name == "pallas_call"]
    assert grids == [(1, 2, 5)], grids
    for h in range(Hq):
        kv, n = h // (Hq // Hkv), lengths[0, h // (Hq // Hkv)]
        s = k[0, :n, kv] @ q[0, 0, h] / np.sqrt(D)
        w = np.exp(s - s.max())
        assert_close(np.asarray(got)[0, 0, h], (w / w.sum()) @ v[0, :n, kv], rel=1e-4, name=f"head {h}")


def _brute_force_kinds(plan, gate, doc):
    """Tile kinds from the dense masks: SKIP when no pair is visible, or when every key of the block has a
    closed gate and every pair that causal and window leave visible is gated; FULL when every pair of the tile
    (padded keys included) is visible and gated; PARTIAL otherwise."""
    t_pos = plan.offset + np.arange(plan.t)[:, None]
    s_pos = np.arange(plan.s_pad)[None, :]
    rel = t_pos - s_pos
    visible = np.broadcast_to(s_pos < plan.s, rel.shape).copy()
    if plan.causal:
        visible &= rel >= 0
    if plan.sliding_window is not None:
        visible &= rel < plan.sliding_window
    gated = np.ones(rel.shape, bool) if plan.local_window is None else rel >= plan.local_window
    B = doc.shape[0] if doc is not None else (gate.shape[0] if gate is not None else 1)
    H = gate.shape[1] if gate is not None else 1
    kinds = np.zeros((B, H, plan.num_q_blocks, plan.num_k_blocks), np.int32)
    for b in range(B):
        vis = visible if doc is None else visible & (doc[b, :plan.t, None] == doc[b, None, :plan.s_pad])
        for h in range(H):
            closed = np.zeros(plan.s_pad, bool) if gate is None else gate[b, h] == -np.inf
            for i in range(plan.num_q_blocks):
                for j in range(plan.num_k_blocks):
                    rows = slice(i * plan.block_q, (i + 1) * plan.block_q)
                    cols = slice(j * plan.block_k, (j + 1) * plan.block_k)
                    shut = closed[cols].all() and gated[rows, cols][visible[rows, cols]].all()
                    if not vis[rows, cols].any() or (gate is not None and shut):
                        continue
                    every = vis[rows, cols].all() and (gate is None or gated[rows, cols].all())
                    kinds[b, h, i, j] = blocks.FULL if every else blocks.PARTIAL
    return kinds


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(t=st.integers(1, 40), extra=st.integers(0, 20), block=st.sampled_from([(4, 4), (8, 4), (4, 8)]),
                  causal=st.booleans(), window=st.one_of(st.none(), st.integers(1, 30)),
                  local=st.one_of(st.none(), st.integers(0, 12)), gated=st.booleans(), docs=st.booleans(),
                  seed=st.integers(0, 2**16))
def test_tile_kinds_match_brute_force(t, extra, block, causal, window, local, gated, docs, seed):
    """SKIP exactly when no pair of the tile contributes (masks, documents, a closed gate on every key of a
    block outside the local window); FULL only when masks would change nothing."""
    rng = np.random.default_rng(seed)
    s = t if docs else t + extra
    causal = causal or window is not None
    plan = _plan(t, s, *block, causal, window, local if gated else None, has_gate=gated, has_segments=docs)
    gate = doc = None
    if gated:
        # Whole blocks closed, and scattered closed keys that close nothing.
        closed = rng.random((2, 2, plan.num_k_blocks)) < 0.5
        gate = np.where(np.repeat(closed, plan.block_k, axis=-1), -np.inf, -rng.random((2, 2, plan.s_pad)))
        gate[rng.random(gate.shape) < 0.2] = -np.inf
        gate[:, :, plan.s:] = -np.inf
    if docs:
        ids = np.cumsum(rng.random((2, t)) < 0.15, axis=1).astype(np.int32)
        doc = np.pad(ids, ((0, 0), (0, max(plan.t_pad, plan.s_pad) - t)), mode="edge")
    got = blocks.tile_kinds(plan, None if gate is None else jnp.asarray(gate, jnp.float32)[:, :, None, :],
                            None if doc is None else jnp.asarray(doc[:, :plan.t_pad])[:, None, :],
                            None if doc is None else jnp.asarray(doc[:, :plan.s_pad])[:, None, :])
    want = _brute_force_kinds(plan, gate, doc)
    np.testing.assert_array_equal(np.broadcast_to(np.asarray(got), want.shape), want)


def test_block_lists_hold_the_visible_tiles_in_order_then_repeat_the_last():
    kinds = jnp.asarray([[[[1, 0, 2, 0], [0, 0, 0, 0], [0, 2, 2, 1]]]], jnp.int32)  # [1, 1, nq=3, nk=4]
    plan = _plan(12, 16, 4, 4, causal=False, window=None)
    lists = blocks.block_lists(plan, kinds, by_query=True)
    decode = lambda e: [(int(x) >> blocks.KIND_BITS, int(x) & 3) for x in e]  # noqa: E731
    rows = [decode(r) for r in np.asarray(lists.entries)[0, 0]]
    assert rows == [[(0, 1), (2, 2), (2, 0), (2, 0)], [(0, 0)] * 4, [(1, 2), (2, 2), (3, 1), (3, 0)]]
    by_key = [decode(r) for r in np.asarray(blocks.block_lists(plan, kinds, by_query=False).entries)[0, 0]]
    assert by_key[2] == [(0, 2), (2, 2), (2, 0)] and by_key[1] == [(2, 2), (2, 0), (2, 0)]
    assert not lists.per_batch and not lists.per_head


def test_compact_ranges_step_through_each_range_then_repeat_its_last_block():
    """SP-KV's compact keys in the pipeline: step s of a row reads block lo + s while s < hi - lo, then repeats
    the range's last block with kind SKIP (no copy, no compute); the step axis is as long as the longest range
    of the call, not one step per possible block."""
    table = jnp.asarray([[[[2, 0, 5], [5, 0, 6]]], [[[0, 3, 1], [1, 3, 4]]]], jnp.int32)  # [B=2, H=1, 2, rows=3]
    ranges = blocks.Ranges(table)
    plan = _plan(48, 48, 16, 16, causal=True, window=None)
    assert int(ranges.steps(plan, by_query=True)) == 3
    decode = lambda e: (int(e) >> blocks.KIND_BITS, int(e) & 3)  # noqa: E731
    rows = [[[decode(ranges.entry(table, b, 0, row, s)) for s in range(3)] for row in range(3)] for b in range(2)]
    P, S = blocks.PARTIAL, blocks.SKIP
    assert rows[0] == [[(2, P), (3, P), (4, P)], [(0, S)] * 3, [(5, P), (5, S), (5, S)]]
    assert rows[1] == [[(0, P), (0, S), (0, S)], [(3, S)] * 3, [(1, P), (2, P), (3, P)]]


def test_pipeline_compact_grid_follows_the_kept_keys():
    """With a hard gate the pipeline's compact key axis is as long as the most compact blocks a query block
    sees: at 10% kept, T=2048 and 128-key blocks, 2 steps (about 205 kept keys) against the 16 of the dense
    causal pipeline (the local window's band adds its own 2)."""
    T, H = 2048, 1
    gate = jnp.asarray(np.where(np.random.default_rng(0).random((1, T, H)) < 0.1, 0.0, -np.inf), jnp.float32)
    index, position, count = compact.kept_order(gate)
    ranges, _ = compact.block_ranges(position, t=T, offset=0, block_q=128, block_k=128, local_window=64,
                                     sliding_window=None, widths=(16, 16))
    plan = _plan(T, T, 128, 128, causal=True, window=None)
    assert int(blocks.Ranges(ranges).steps(plan, by_query=True)) == -(-int(count.max()) // 128) == 2
    assert blocks.steps(plan, by_query=True) == 16


def test_spkv_tpu_build_runs_the_band_and_compact_axes_of_traced_length():
    """Lowered for TPU, SP-KV with a local window is the band's three kernels (a step axis of 2 key blocks at a
    64-key window) and the compact keys' three, whose step axes (and dk/dv's key-block axis) are traced bounds;
    the report shows them as '?'."""
    from lm.bench import kernels

    case = next(c for c in catalog.cases() if c.kernel == "flash" and c.shape == "bfloat16 d128 T2048 gqa4-gate-local")
    grids = [s.grid for s in kernels.kernel_structures(case.fn, *case.args, target="tpu")]
    assert sorted(grids) == sorted([(1, 8, 4, 2), (1, 8, 4, 2), (1, 2, 4, 4, 2),
                                    (1, 8, 4, -1), (1, 8, 4, -1), (1, 2, -1, 4, -1)]), grids
    row = dict(target="tpu", T=2048, **kernels.KernelStructure("k", (1, 2, -1), [], [], 0, []).as_dict())
    assert "grid 1x2x?" in kernels.format_row(row) and "? programs" in kernels.format_row(row)


def test_pipeline_skips_tiles_a_closed_gate_shuts():
    """Keys whose gate is -inf in a whole block, beyond every query's local window, are never loaded: NaN
    keys and values there leave every output and gradient finite (a loaded tile would give NaN + -inf)."""
    name = "mqa-gate-local-window"  # T = S = 77, local window 24, 16-key blocks
    arrays, _ = softmax_cases.case_arrays(name)
    poison = jnp.zeros((77,)).at[16:32].set(jnp.nan)[None, :, None, None]
    gate = arrays["gate"].at[:, 16:32].set(-jnp.inf)
    outs = softmax_cases.run("pallas-pipeline", name, k=arrays["k"] + poison, v=arrays["v"] + poison, gate=gate)
    o, dq = (np.asarray(x) for x in outs[:2])
    # Queries 16..54 reach keys 16..31 inside their local window, where no gate applies: they see the poison.
    # Queries 0..15 precede them; query blocks from 64 on are 33+ steps past them, all gated and closed.
    assert np.isnan(o[:, 16:55]).all(), "the poison did not reach the rows that see it; the test checks nothing"
    for what, x in (("o", o), ("dq", dq)):
        assert np.isfinite(x[:, :16]).all() and np.isfinite(x[:, 64:]).all(), what


def test_tpu_builds_use_the_pipeline_within_vmem():
    """Every catalogued flash case lowers for TPU through the three pipeline kernels, each with a scoped VMEM
    limit that holds its estimate, independent of T."""
    case = next(c for c in catalog.cases() if c.kernel == "flash" and "segments" in c.shape)
    text = platform.lower(case.fn, *case.args, platform="tpu").as_text()
    for kernel in ("flash_forward_pipeline", "flash_dq_pipeline", "flash_dkv_pipeline"):
        assert f'kernel_name = "{kernel}"' in text
    plans = [_plan(t, t, 512, 512, causal=True, window=None, local_window=64, has_gate=True, has_segments=True)
             for t in (8192, 32768)]
    estimates = {pipeline.vmem_estimate(p, 128, 128, jnp.bfloat16) for p in plans}
    assert len(estimates) == 1 and estimates.pop() <= 16 * pipeline.MIB


# --- the row driver on GPU: unmasked inner tiles, heaviest blocks first, the per-chip tile table ------------


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(t=st.integers(1, 70), extra=st.integers(0, 30), block_q=st.sampled_from([4, 8, 16]),
                  block_k=st.sampled_from([4, 8, 16]), causal=st.booleans(),
                  window=st.one_of(st.none(), st.integers(1, 40)), local=st.one_of(st.none(), st.integers(0, 20)))
def test_unmasked_ranges_are_exactly_the_full_tiles(t, extra, block_q, block_k, causal, window, local):
    """The loops run [a, b) of each range without masks: exactly the tiles `blocks` calls FULL (checked against
    brute force above), from the query side (forward, dq) and the key side (dk/dv)."""
    causal = causal or window is not None
    plan = _plan(t, t + extra, block_q, block_k, causal, window, local, has_gate=local is not None)
    full = blocks.static_kinds(plan) == blocks.FULL
    for i in range(plan.num_q_blocks):
        a, b = (int(x) for x in plan.full_kv_range(i))
        lo, hi = (int(x) for x in plan.kv_range(i))
        assert lo <= a <= b <= hi and set(range(a, b)) == set(np.flatnonzero(full[i])), f"query block {i}"
    for j in range(plan.num_k_blocks):
        a, b = (int(x) for x in plan.full_q_range(j))
        lo, hi = (int(x) for x in plan.q_range(j))
        assert lo <= a <= b <= hi and set(range(a, b)) == set(np.flatnonzero(full[:, j])), f"key block {j}"


def test_causal_rows_start_with_the_longest():
    plan = _plan(64, 64, 16, 16, causal=True, window=None)
    assert [plan.q_order(i) for i in range(4)] == [3, 2, 1, 0]
    assert [_plan(64, 64, 16, 16, causal=False, window=None).q_order(i) for i in range(4)] == [0, 1, 2, 3]


def test_gpu_tile_table_tune_writes_the_fastest_and_lookup_reads_it(tmp_path):
    from kernels_pallas.flash import gpu_tiles

    table = tmp_path / "tiles.json"
    table.write_text(gpu_tiles.TABLE.read_text())
    fast = gpu_tiles.Tiles(128, 64, ((8, 3), (4, 3), (8, 3)))
    others = [gpu_tiles.Tiles(64, 64, ((4, 2),) * 3), gpu_tiles.Tiles(64, 128, ((4, 2),) * 3)]

    def measure(tiles, head_dim):  # a fake clock: `fast` wins, one candidate cannot run at head dim 128
        if tiles == others[1] and head_dim == 128:
            return None
        return 1.0 if tiles == fast else 2.0

    timings = gpu_tiles.tune(measure, "NVIDIA H100 80GB HBM3", [64, 128], path=table, tiles=[*others, fast])
    assert [t for t, _ in timings["d128"]] == [2.0, None, 1.0]
    written = gpu_tiles.load(table)
    assert set(written) == {"default", "NVIDIA H100 80GB HBM3"}
    assert gpu_tiles.lookup("NVIDIA H100 80GB HBM3", 128, written) == fast
    assert gpu_tiles.lookup("NVIDIA H100 80GB HBM3", 96, written) == fast        # padded to d128
    assert gpu_tiles.lookup("NVIDIA A100", 64, written) == gpu_tiles.lookup("default", 64, written)
    assert gpu_tiles.lookup("default", 256, written) == gpu_tiles.lookup("default", 128, written)  # the largest
    with pytest.raises(RuntimeError, match="no candidate tile ran"):
        gpu_tiles.tune(lambda tiles, d: None, "x", [64], path=table, tiles=others)


def test_gpu_builds_take_the_chips_tiles_and_the_cli_tunes_only_on_a_gpu(capsys):
    """Lowered for an H200 the kernels get the table's default tiles (8 warps for dk/dv at head dim 128); the
    tuner needs a GPU."""
    from kernels_pallas.flash import gpu_tiles
    from lm import cli
    from lm.bench import kernels

    want = gpu_tiles.lookup("NVIDIA H200", 128)
    case = next(c for c in catalog.cases() if c.kernel == "flash" and c.shape == "bfloat16 d128 T2048 mha")
    launch = [(warps, stages) for _, _, warps, stages in kernels.triton_modules(case.fn, *case.args)]
    assert launch == [want.launch[0], want.launch[1], want.launch[2]]
    assert cli.main(["kernels", "tune"]) == 2
    assert "on the GPU it runs on; this machine's backend is cpu" in capsys.readouterr().err


@pytest.mark.parametrize("head_dim", [64, 128])
def test_default_gpu_tiles_compile_without_spills(head_dim):
    from kernels_pallas.flash import gpu_tiles
    from lm.bench import flash_tiles, kernels

    assert kernels.ptxas_available(), "the test extra installs triton, whose ptxas this check needs"
    assert flash_tiles.spills(gpu_tiles.lookup("default", head_dim), head_dim) == {
        "flash_forward": 0, "flash_dq": 0, "flash_dkv": 0}


def test_pipeline_refuses_block_lists_beyond_its_smem_budget():
    """Lists per (sequence, kv head) grow with B * Hkv * (T / block)^2; past the budget the build says so
    instead of failing in libtpu's compile."""
    plan = _plan(32768, 32768, 512, 512, causal=True, window=None, local_window=64, has_gate=True)
    small = jnp.zeros((2, 4, 1, 32768), jnp.float32)
    assert pipeline._row_lists(plan, small, None, None, by_query=True).entries.shape == (2, 4, 64, 64)
    with pytest.raises(ValueError, match=r"block lists \(8, 8, 64, 64\) need 1024 KiB of SMEM"):
        pipeline._row_lists(plan, jnp.zeros((8, 8, 1, 32768), jnp.float32), None, None, by_query=True)


# --- the row driver reads the op's layout in place; ragged T and S end in masked blocks ---------------------


def _grads_of(fn, q, k, v, gate, do, **opts):
    o, vjp = jax.vjp(lambda q, k, v, g: fn(q, k, v, key_log_gate=g, **opts), q, k, v, gate)
    return (o, *vjp(do))


@pytest.mark.parametrize("T, hard_gate", [(77, False), (50, True)])
def test_gpu_build_interpreted_masks_ragged_rows_and_head_dims(T, hard_gate):
    """The GPU build (the default tiles for head dim 64: 128 query rows, 64 keys; tiles 32 and 64 wide for head
    dims 24 and 40) run interpreted: T ends in partial blocks (T = 50: shorter than one block on both sides)
    and the tiles' columns pass the head dims, both read through masked loads (interpret mode fills the rest
    with NaN) and written through masked stores. GQA, local window and gate (dense, or hard: the compact
    keys), documents; fp32 against the oracle."""
    rng = np.random.default_rng(3)
    Hq, Hkv, D, Dv = 4, 2, 24, 40
    q, k, v, do = (jnp.asarray(rng.standard_normal(sh, np.float32)) for sh in
                   ((2, T, Hq, D), (2, T, Hkv, D), (2, T, Hkv, Dv), (2, T, Hq, Dv)))
    gate = -np.abs(rng.standard_normal((2, T, Hkv))).astype(np.float32)
    if hard_gate:
        gate = np.where(gate > -0.5, 0.0, -np.inf).astype(np.float32)
    segments = softmax_cases._segments(T, [[0, 30], [0, 50]])
    args = (q, k, v, jnp.asarray(gate), do)
    opts = dict(sliding_window=60, local_window=12)
    want = jax.jit(lambda: _grads_of(softmax_attention_reference, *args, segment_ids=segments, **opts))()
    with platform.targeting("gpu"):
        got = jax.jit(lambda: _grads_of(functools.partial(flash_attention, interpret=True), *args,
                                        doc_ids=documents(segments), **opts))()
    for what, a, e in zip(("o", "dq", "dk", "dv", "dgate"), got, want):
        assert_close(a, e, rel=1e-5, name=what)


def test_gpu_lowering_copies_no_operand_through_hbm():
    """Lowered for cuda, one forward + backward has no transpose, pad or slice of a q/k/v/o-sized tensor, at a
    ragged T and a head dim that is not a power of two, with the SP-KV gate (compact keys) or without. The
    TPU pipeline's heads-first copies show that the count sees them."""
    from experiments.bench.flash_layout_copies import layout_copies, lowered_step

    T, D = 200, 80
    for gate in (False, True):
        assert layout_copies(lowered_step(T, D, gate=gate, platform_name="cuda", Hq=4, Hkv=2), T * D) == {}
    tpu = layout_copies(lowered_step(T, D, gate=False, platform_name="tpu", Hq=4, Hkv=2), T * D)
    assert tpu[("transpose", f"1x4x{T}x{D}")] >= 2, tpu  # q and dO, heads first


def test_triton_masks_exactly_the_ragged_blocks():
    """Every store of every kernel is masked when T ends in a partial block and the head dim is not a power of
    two; with whole blocks and a power-of-two head dim no load or store is."""
    from lm.bench import kernels

    def modules(T, D):
        spec = [jax.ShapeDtypeStruct((1, T, h, D), jnp.bfloat16) for h in (4, 2, 2)]
        grads = jax.grad(lambda q, k, v: jnp.sum(flash_attention(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
        return {name: ir for name, ir, _, _ in kernels.triton_modules(grads, *spec)}

    def access(ir, op):  # (masked, unmasked) counts: a masked tt.load / tt.store has a mask operand
        ops = [line.split(":")[0] for line in ir.splitlines() if op in line]
        return sum(line.count(",") >= (2 if op == "tt.store" else 1) for line in ops), len(ops)

    whole, ragged = modules(256, 128), modules(250, 80)
    assert set(whole) == set(ragged) == {"flash_forward", "flash_dq", "flash_dkv"}
    for name in whole:
        assert access(whole[name], "tt.load")[0] == 0 and access(whole[name], "tt.store")[0] == 0, name
        masked, total = access(ragged[name], "tt.store")
        assert masked == total > 0, name
    # dk/dv reads even a ragged last query block without masks (shifted back to end at T): its query tiles
    # (q, dO, lse, delta: 64 rows at head dim 128's default tiles) load unmasked in both loop bodies, the
    # masked edge and the inner one; its ragged 32-key block does not.
    dkv = "\n".join(line for line in modules(250, 128)["flash_dkv"].splitlines() if "tt.load" in line)
    queries = "\n".join(line for line in dkv.splitlines() if "tensor<64x" in line)
    assert access(queries, "tt.load") == (0, 8) and access(dkv, "tt.load")[0] > 0, dkv


def test_row_driver_refuses_a_tpu_build():
    q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    with platform.targeting("tpu"), pytest.raises(ValueError, match="Mosaic does not lower"):
        jax.eval_shape(functools.partial(flash_attention, driver="rows"), q, q, q)
