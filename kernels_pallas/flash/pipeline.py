"""Flash attention as a TPU pipeline: the key (or query) loop is a sequential grid axis, so each grid step holds
one block of every operand in VMEM whatever T is.

The row driver (forward.py, backward.py) gives every program its head's whole K and V rows, and dk/dv the
group's whole q, dO, lse and delta rows: portable (Triton has no scratch memory, so its carry must live in a
loop), but its VMEM grows with T. Here:

- forward and dq: grid (batch, query head, query block, step), the step axis sequential ("arbitrary"); step s
  reads the s-th key block the query block sees, from `blocks.block_lists` prefetched into SMEM; m, l and the
  output (or dq) accumulate in VMEM scratch across the steps;
- dk/dv: grid (batch, kv head, key block, group head, step): the query blocks that see the key block, for each
  query head of the group, accumulating dk, dv and the gate's gradient in scratch. The tile is computed keys
  major ([bk, bq]), so the per-query rows lse and delta broadcast as they are stored.

An entry past a row's last visible tile repeats the previous block index (the pipeline issues no copy) and is
skipped; FULL tiles skip every compare. SP-KV's compact keys (compact.py: the kept keys gathered with their
positions) run the same kernels with `blocks.Ranges` for lists: each row's compact blocks form one range, so
only the ranges table is prefetched, and the step axis (and the dk/dv key-block axis) is a traced grid bound,
the longest range of the call (the compact blocks up to the last kept key), so the grid shrinks with the
gate's density. lse and delta are stored lane-dense as [B, H, 1, T]; the row to column
change that the forward and dq need happens once per tile in VMEM. `vmem_limit_bytes` is set per chip.
The kernels also run interpreted on the CPU (generic interpret and the TPU interpreter), which the tests use.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import platform
from kernels_pallas.flash import blocks, compact, tiles
from kernels_pallas.flash.forward import unpack
from kernels_pallas.flash.tiles import Plan

LANES = 128
MIB = 1 << 20
# VMEM per TensorCore by device kind (jax's chip tables); an unknown kind gets the smallest.
VMEM_BYTES = {"TPU v4": 16 * MIB, "TPU v4 lite": 16 * MIB, "TPU v5 lite": 128 * MIB, "TPU v5e": 128 * MIB,
              "TPU v5": 64 * MIB, "TPU v5p": 64 * MIB, "TPU v6 lite": 128 * MIB, "TPU v6e": 128 * MIB,
              "TPU7x": 64 * MIB}


def vmem_capacity() -> int:
    return VMEM_BYTES.get(tiles.device_kind(), min(VMEM_BYTES.values()))


def _padded_bytes(shape, dtype) -> int:
    """VMEM bytes of a block: the last two dims padded to (8 sublanes for 32-bit, 16 for 16-bit, 128 lanes)."""
    *lead, rows, cols = (1, *shape) if len(shape) == 1 else shape
    itemsize = jnp.dtype(dtype).itemsize
    sublanes = 8 * (4 // itemsize)
    n = 1
    for x in lead:
        n *= x
    return n * (-(-rows // sublanes) * sublanes) * (-(-cols // LANES) * LANES) * itemsize


def vmem_estimate(plan: Plan, d: int, dv: int, dtype) -> int:
    """The largest of the three kernels' VMEM per grid step: double-buffered blocks, scratch, and four fp32
    [bq, bk] temporaries (scores, probabilities, dP, dS)."""
    bq, bk, f32 = plan.block_q, plan.block_k, jnp.float32
    q_rows = [((bq, d), dtype), ((bq, dv), dtype), ((1, bq), f32), ((1, bq), f32)]  # q, do/o, lse, delta
    k_rows = [((bk, d), dtype), ((bk, dv), dtype), ((1, bk), f32)]                  # k, v, gate
    docs = [((1, bq), jnp.int32), ((1, bk), jnp.int32)] if plan.has_segments else []
    docs += [((1, bk), jnp.int32)] if plan.compact else []  # compact keys' positions
    blocks_bytes = 2 * sum(_padded_bytes(s, t) for s, t in q_rows + k_rows + docs + [((bq, d), dtype)])
    scratch = max(_padded_bytes((bq, dv), f32) + 2 * _padded_bytes((bq, 1), f32),
                  _padded_bytes((bk, d), f32) + _padded_bytes((bk, dv), f32) + _padded_bytes((bk, 1), f32))
    return blocks_bytes + scratch + 4 * _padded_bytes((bq, bk), f32)


def vmem_limit(plan: Plan, d: int, dv: int, dtype) -> int:
    """The scoped VMEM limit to compile with: twice the estimate, at least the 32 MiB most chips default to, at
    most the chip's VMEM."""
    return int(min(vmem_capacity(), max(32 * MIB, 2 * vmem_estimate(plan, d, dv, dtype))))


def _block_of(entry):
    return lax.shift_right_logical(entry, blocks.KIND_BITS)


def _column(ref):
    """A [1, n] block as an [n, 1] column."""
    return jnp.expand_dims(ref[0], -1)


def _row(col):
    """An [n, 1] column as a [1, n] row, through a tile-aligned transpose of the column repeated on every lane."""
    return jnp.transpose(jnp.broadcast_to(col, (col.shape[0], LANES)))[:1]


def _by_kind(entry, tile):
    """tile(masked) for a FULL (unmasked) or PARTIAL (masked) entry; nothing for SKIP."""
    kind = entry & ((1 << blocks.KIND_BITS) - 1)
    pl.when(kind == blocks.FULL)(lambda: tile(False))
    pl.when(kind == blocks.PARTIAL)(lambda: tile(True))


def _query_tile(plan: Plan, r, i, entry, masked: bool):
    """(logits, k, v) of query block i against the entry's key block: the forward's and dq's tile."""
    k = r.k[...]
    v = k if plan.kv_shared else r.v[...]
    gate = None if r.gate is None else r.gate[...]
    docs = (_column(r.q_doc), r.k_doc[...]) if masked and r.q_doc is not None else (None, None)
    k_pos = None if r.k_pos is None else r.k_pos[...]
    scores, _ = tiles.logits(plan, r.q[...], k, i, _block_of(entry), gate, *docs, masked=masked, k_pos=k_pos)
    return scores, k, v


def _query_step(plan: Plan, lists, entries_ref):
    """(query block, step, list entry) of a forward or dq grid step (batch, head, query block, step)."""
    b, h, i, s = (pl.program_id(a) for a in range(4))
    return i, s, lists.entry(entries_ref, b, h // plan.group, i, s)


def _last(axis: int, s):
    """Whether s is the last step of the sequential grid axis (its length may be a traced bound)."""
    return s == pl.num_programs(axis) - 1


def _forward_kernel(entries_ref, *refs, plan: Plan, lists):
    r, (o_ref, lse_ref, m_ref, l_ref, acc_ref) = unpack(plan, refs)
    i, s, entry = _query_step(plan, lists, entries_ref)

    @pl.when(s == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def tile(masked):
        scores, _, v = _query_tile(plan, r, i, entry, masked)
        m, l, acc = tiles.online_softmax_step(m_ref[...], l_ref[...], acc_ref[...], scores, v)
        m_ref[...], l_ref[...], acc_ref[...] = m, l, acc

    _by_kind(entry, tile)

    @pl.when(_last(3, s))
    def _finish():
        l = l_ref[...]
        seen = l > 0
        l_safe = jnp.where(seen, l, 1.0)
        o_ref[...] = (acc_ref[...] / l_safe).astype(o_ref.dtype)
        # +inf for a row that sees no key: the backward's exp(s - lse) is then an exact 0.
        lse_ref[...] = _row(jnp.where(seen, m_ref[...] + jnp.log(l_safe), jnp.inf))


def _dq_kernel(entries_ref, *refs, plan: Plan, lists):
    r, (do_ref, lse_ref, delta_ref, dq_ref, acc_ref) = unpack(plan, refs)
    i, s, entry = _query_step(plan, lists, entries_ref)

    @pl.when(s == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def tile(masked):
        scores, k, v = _query_tile(plan, r, i, entry, masked)
        p = jnp.exp(scores - _column(lse_ref))
        ds = p * (tiles.dot(do_ref[...], v, contract=(1, 1)) - _column(delta_ref))
        acc_ref[...] += tiles.dot(ds.astype(k.dtype), k)

    _by_kind(entry, tile)

    @pl.when(_last(3, s))
    def _finish():
        dq_ref[...] = (acc_ref[...] * plan.scale).astype(dq_ref.dtype)


def _dkv_kernel(entries_ref, *refs, plan: Plan, lists):
    r, rest = unpack(plan, refs)
    do_ref, lse_ref, delta_ref, dk_ref, *rest = rest
    dv_ref = None if plan.kv_shared else rest.pop(0)
    dgate_ref = rest.pop(0) if plan.has_gate else None
    dk_acc, dv_acc, *dgate_acc = rest
    b, h, j, g, s = (pl.program_id(a) for a in range(5))
    entry = lists.entry(entries_ref, b, h, j, s)

    @pl.when((g == 0) & (s == 0))
    def _init():
        for acc in (dk_acc, dv_acc, *dgate_acc):
            acc[...] = jnp.zeros(acc.shape, jnp.float32)

    def tile(masked):
        q, do, k = r.q[...], do_ref[...], r.k[...]
        v = k if plan.kv_shared else r.v[...]
        gate = None if r.gate is None else _column(r.gate)
        docs = (r.q_doc[...], _column(r.k_doc)) if masked and r.q_doc is not None else (None, None)
        k_pos = None if r.k_pos is None else _column(r.k_pos)
        scores, gated = tiles.logits(plan, q, k, _block_of(entry), j, gate, *docs, masked=masked,
                                     keys_major=True, k_pos=k_pos)
        p = jnp.exp(scores - lse_ref[...])
        dv_acc[...] += tiles.dot(p.astype(do.dtype), do)
        ds = p * (tiles.dot(v, do, contract=(1, 1)) - delta_ref[...])
        dk_acc[...] += tiles.dot(ds.astype(q.dtype), q)
        if dgate_acc:
            dgate_acc[0][...] += jnp.sum(ds if gated is None else jnp.where(gated, ds, 0.0), axis=1, keepdims=True)

    _by_kind(entry, tile)

    @pl.when((g == plan.group - 1) & _last(4, s))
    def _finish():
        dk = dk_acc[...] * plan.scale
        if plan.kv_shared:
            dk_ref[...] = (dk + dv_acc[...]).astype(dk_ref.dtype)
        else:
            dk_ref[...] = dk.astype(dk_ref.dtype)
            dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)
        if dgate_ref is not None:
            dgate_ref[...] = _row(dgate_acc[0][...])


def _specs(plan: Plan, d: int, dv: int, q_index, k_index):
    """Block specs of (q, k, [v], [gate], [q_doc, k_doc], [k_pos]) given the grid index -> (batch, query head,
    query block) and -> (batch, kv head, key block) maps. Compact keys carry their positions and document ids
    per kv head."""
    bq, bk = plan.block_q, plan.block_k

    def at(index, place):
        return lambda *ids: place(*index(*ids))

    specs = [pl.BlockSpec((None, None, bq, d), at(q_index, lambda b, h, i: (b, h, i, 0))),
             pl.BlockSpec((None, None, bk, d), at(k_index, lambda b, h, j: (b, h, j, 0)))]
    if not plan.kv_shared:
        specs.append(pl.BlockSpec((None, None, bk, dv), at(k_index, lambda b, h, j: (b, h, j, 0))))
    key_row = pl.BlockSpec((None, None, 1, bk), at(k_index, lambda b, h, j: (b, h, 0, j)))
    if plan.has_gate:
        specs.append(key_row)
    if plan.has_segments:
        specs += [pl.BlockSpec((None, 1, bq), at(q_index, lambda b, h, i: (b, 0, i))),
                  key_row if plan.compact else pl.BlockSpec((None, 1, bk), at(k_index, lambda b, h, j: (b, 0, j)))]
    if plan.compact:
        specs.append(key_row)
    return specs


# The block lists are prefetched whole into SMEM (1 MiB per core on v5e and v5p); half of it is theirs.
SMEM_BUDGET = 512 * 1024


def _row_lists(plan: Plan, gate, q_doc, k_doc, *, by_query: bool, ranges=None):
    """The grid steps of each row: the compact ranges (`blocks.Ranges`) for compact keys, else the block lists
    of the tiles that masks, documents and the gate leave."""
    if ranges is not None:
        return blocks.Ranges(ranges)
    lists = blocks.block_lists(plan, blocks.tile_kinds(plan, gate, q_doc, k_doc), by_query=by_query)
    need = lists.entries.size * 4
    if need > SMEM_BUDGET:
        # Per (sequence, kv head) with a gate, per sequence with documents: 16 KiB each at T=32768 and 512-row
        # blocks. A call over fewer sequences or kv heads (or longer blocks) fits.
        raise ValueError(f"the TPU pipeline's block lists {tuple(lists.entries.shape)} need {need // 1024} KiB of "
                         f"SMEM, over its {SMEM_BUDGET // 1024} KiB: split the batch (or the kv heads) over "
                         f"calls or devices, or use longer blocks")
    return lists


def _call(kernel, plan: Plan, lists, grid, in_specs, out_specs, out_shape, scratch, semantics, name, d, dv, dtype):
    return pl.pallas_call(
        functools.partial(kernel, plan=plan, lists=lists), out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                               out_specs=out_specs, scratch_shapes=scratch),
        interpret=plan.interpret, name=name,
        compiler_params=platform.compiler_params(tpu=dict(dimension_semantics=semantics,
                                                          vmem_limit_bytes=vmem_limit(plan, d, dv, dtype))),
    )


def _query_rows(plan: Plan, lists):
    """Index maps of the forward/dq grid (b, h, i, s): the query block and the s-th key block it sees."""
    G = plan.group
    q_index = lambda b, h, i, s, e: (b, h, i)  # noqa: E731
    k_index = lambda b, h, i, s, e: (b, h // G, _block_of(lists.entry(e, b, h // G, i, s)))  # noqa: E731
    return q_index, k_index


def forward(plan: Plan, q, k, v, gate, q_doc, k_doc, k_pos=None, ranges=None):
    """q [B,Hq,Tp,D], k [B,Hkv,Sp,D], v [B,Hkv,Sp,Dv] or None (v is k), gate [B,Hkv,1,Sp] fp32 padded with
    -inf or None, q_doc [B,1,Tp] and k_doc [B,1,Sp] (compact keys: [B,Hkv,1,Sp]) int32 or None; compact keys'
    k_pos [B,Hkv,1,Sp] and ranges [B,Hkv,2,nq] int32 -> (o [B,Hq,Tp,Dv], lse [B,Hq,1,Tp] fp32)."""
    B, Hq, Tp, D = q.shape
    Dv = D if v is None else v.shape[-1]
    bq = plan.block_q
    lists = _row_lists(plan, gate, q_doc, k_doc, by_query=True, ranges=ranges)
    n = lists.steps(plan, by_query=True)
    q_index, k_index = _query_rows(plan, lists)
    out_specs = [pl.BlockSpec((None, None, bq, Dv), lambda b, h, i, s, e: (b, h, i, 0)),
                 pl.BlockSpec((None, None, 1, bq), lambda b, h, i, s, e: (b, h, 0, i))]
    out_shape = [jax.ShapeDtypeStruct((B, Hq, Tp, Dv), q.dtype), jax.ShapeDtypeStruct((B, Hq, 1, Tp), jnp.float32)]
    scratch = [pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, Dv), jnp.float32)]
    inputs = [x for x in (q, k, v, gate, q_doc, k_doc, k_pos) if x is not None]
    return _call(_forward_kernel, plan, lists, (B, Hq, plan.num_q_blocks, n),
                 _specs(plan, D, Dv, q_index, k_index), out_specs, out_shape, scratch,
                 ("parallel", "parallel", "parallel", "arbitrary"), "flash_forward_pipeline", D, Dv, q.dtype,
                 )(lists.table, *inputs)


def backward(plan: Plan, q, k, v, gate, q_doc, k_doc, o, lse, do, k_pos=None, ranges=None, key_ranges=None):
    """Gradients (dq, dk, dv, dgate) in the input dtypes (dv None when v is None: it is added into dk; dgate fp32
    [B,Hkv,1,Sp] or None); lse [B,Hq,1,Tp] from `forward`. Compact keys bring k_pos, the forward's ranges and
    key_ranges [B,Hkv,2,nk]: per compact block, the query blocks that see it. Their dk/dv grid covers the
    compact blocks up to the last kept key of the call; the blocks after it hold only empty slots and are not
    written (the gather's gradient drops empty slots, `compact.gather`)."""
    B, Hq, Tp, D = q.shape
    Hkv, Sp = k.shape[1], k.shape[2]
    Dv = D if v is None else v.shape[-1]
    G, bq, bk = plan.group, plan.block_q, plan.block_k
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)[:, :, None, :]
    inputs = [x for x in (q, k, v, gate, q_doc, k_doc, k_pos) if x is not None]

    lists = _row_lists(plan, gate, q_doc, k_doc, by_query=True, ranges=ranges)
    n = lists.steps(plan, by_query=True)
    q_index, k_index = _query_rows(plan, lists)
    row_specs = [pl.BlockSpec((None, None, bq, Dv), lambda b, h, i, s, e: (b, h, i, 0)),
                 pl.BlockSpec((None, None, 1, bq), lambda b, h, i, s, e: (b, h, 0, i)),
                 pl.BlockSpec((None, None, 1, bq), lambda b, h, i, s, e: (b, h, 0, i))]
    dq = _call(_dq_kernel, plan, lists, (B, Hq, plan.num_q_blocks, n),
               _specs(plan, D, Dv, q_index, k_index) + row_specs,
               pl.BlockSpec((None, None, bq, D), lambda b, h, i, s, e: (b, h, i, 0)),
               jax.ShapeDtypeStruct(q.shape, q.dtype), [pltpu.VMEM((bq, D), jnp.float32)],
               ("parallel", "parallel", "parallel", "arbitrary"), "flash_dq_pipeline", D, Dv, q.dtype,
               )(lists.table, *inputs, do, lse, delta)

    lists = _row_lists(plan, gate, q_doc, k_doc, by_query=False, ranges=key_ranges)
    n = lists.steps(plan, by_query=False)
    key_blocks = plan.num_k_blocks
    if plan.compact:
        kept = jnp.max(jnp.sum(k_pos < compact.FAR, axis=-1, dtype=jnp.int32))
        key_blocks = jnp.maximum(-(-kept // bk), 1)

    def q_block(b, h, j, g, s, e):
        return _block_of(lists.entry(e, b, h, j, s))

    q_index = lambda b, h, j, g, s, e: (b, h * G + g, q_block(b, h, j, g, s, e))  # noqa: E731
    k_index = lambda b, h, j, g, s, e: (b, h, j)  # noqa: E731
    column_specs = [
        pl.BlockSpec((None, None, bq, Dv), lambda b, h, j, g, s, e: (b, h * G + g, q_block(b, h, j, g, s, e), 0)),
        pl.BlockSpec((None, None, 1, bq), lambda b, h, j, g, s, e: (b, h * G + g, 0, q_block(b, h, j, g, s, e))),
        pl.BlockSpec((None, None, 1, bq), lambda b, h, j, g, s, e: (b, h * G + g, 0, q_block(b, h, j, g, s, e)))]
    key_block = lambda width: pl.BlockSpec((None, None, bk, width), lambda b, h, j, g, s, e: (b, h, j, 0))  # noqa: E731
    out_specs, out_shape = [key_block(D)], [jax.ShapeDtypeStruct(k.shape, k.dtype)]
    if v is not None:
        out_specs.append(key_block(Dv))
        out_shape.append(jax.ShapeDtypeStruct(v.shape, v.dtype))
    if gate is not None:
        out_specs.append(pl.BlockSpec((None, None, 1, bk), lambda b, h, j, g, s, e: (b, h, 0, j)))
        out_shape.append(jax.ShapeDtypeStruct((B, Hkv, 1, Sp), jnp.float32))
    scratch = [pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, Dv), jnp.float32)]
    scratch += [pltpu.VMEM((bk, 1), jnp.float32)] if gate is not None else []
    outs = list(_call(_dkv_kernel, plan, lists, (B, Hkv, key_blocks, G, n),
                      _specs(plan, D, Dv, q_index, k_index) + column_specs, out_specs, out_shape, scratch,
                      ("parallel", "parallel", "parallel", "arbitrary", "arbitrary"), "flash_dkv_pipeline",
                      D, Dv, q.dtype)(lists.table, *inputs, do, lse, delta))
    dk = outs.pop(0)
    dv = None if v is None else outs.pop(0)
    dgate = outs.pop(0) if gate is not None else None
    return dq, dk, dv, dgate
