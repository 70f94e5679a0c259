"""Flash-attention backward of the row driver, two kernels that recompute the probabilities from the saved lse,
reading and writing the op's layout in place as the forward does (forward.py):

- dq: grid (batch, query head, query block), a loop over the visible key blocks (as the forward);
- dk/dv (and the key gate's gradient): grid (batch, kv head, key block), a loop over the query heads of the
  group and, for each, over the query blocks that see the key block. Each kv head's gradients are summed in
  one kernel instance, with no repeated K/V and no atomics. When one array is both key and value, the kernel
  reads one tile for both and writes dk + dv once.

dS = P * (dP - delta) is the gradient of the logit, delta = rowsum(dO * O) in fp32; dq and dk carry the
softmax scale, the gate's gradient is dS summed over the query rows it applies to.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.flash import compact, tiles
from kernels_pallas.flash.forward import compiler_params, key_row, kv_loop, query_block, query_column, row_specs, unpack
from kernels_pallas.flash.tiles import Plan


def _dq_kernel(*refs, plan: Plan):
    r, (do_ref, lse_ref, delta_ref, dq_ref) = unpack(plan, refs)
    i = plan.q_order(pl.program_id(2))
    rows = plan.query_rows(i)
    q = tiles.load(r.q, rows=rows, cols=plan.cols(0))
    do = tiles.load(do_ref, rows=rows, cols=plan.cols(1))
    # Rows past T: lse +inf makes their probabilities an exact 0.
    lse = tiles.in_logit_base(plan, query_column(lse_ref, (), rows, other=jnp.inf))
    delta = query_column(delta_ref, (), rows)
    q_doc = None if r.q_doc is None else query_column(r.q_doc, (), rows, other=-1)

    def tile(k, v, s, dq):
        p = tiles.exp_of(plan)(s - lse)
        ds = p * (tiles.dot(do, v, contract=(1, 1)) - delta)
        return dq + tiles.dot(ds.astype(k.dtype), k)

    dq = kv_loop(plan, r, i, q, q_doc, tile, jnp.zeros(q.shape, jnp.float32))
    tiles.store(dq_ref, (dq * plan.scale).astype(dq_ref.dtype), rows=rows, cols=plan.cols(0))


def _dkv_kernel(*refs, plan: Plan):
    r, outs = unpack(plan, refs)
    do_ref, lse_ref, delta_ref, *outs = outs
    dk_ref = outs.pop(0)
    dv_ref = None if plan.kv_shared else outs.pop(0)
    dgate_ref = outs.pop(0) if plan.has_gate else None
    j = pl.program_id(2)
    key_rows = plan.key_rows(j)
    k = tiles.load(r.k, rows=key_rows, cols=plan.cols(0))
    v = k if plan.kv_shared else tiles.load(r.v, rows=key_rows, cols=plan.cols(1))
    gate = None if r.gate is None else key_row(r.gate, (), key_rows).astype(jnp.float32)
    k_doc = None if r.k_doc is None else key_row(r.k_doc, (), key_rows, other=-1)
    k_pos = None if r.k_pos is None else key_row(r.k_pos, (), key_rows, other=compact.FAR)
    bq = plan.block_q
    if plan.compact:
        lo, hi = tiles.pick(r.ranges, 0, j), tiles.pick(r.ranges, 1, j)
        a, b = hi, hi
    else:
        (lo, hi), (a, b) = plan.q_range(j), plan.full_q_range(j)
        if plan.t % bq:
            # The ragged last query block joins the masked edge, so the unmasked loop loads without bounds.
            b = jnp.minimum(b, plan.t // bq)
            a = jnp.minimum(a, b)

    # A ragged last query block is read shifted back to end at T: in bounds without masked loads (which cost
    # dk/dv registers), its rows of the block before masked out of the logits.
    shift = plan.t % bq != 0 and plan.t >= bq

    def query_block(g, masked, i, carry):
        q_start = jnp.minimum(i * bq, plan.t - bq) if masked and shift else None
        if q_start is None:
            block, rows = pl.ds(pl.multiple_of(i * bq, bq), bq), plan.query_rows(i, masked)
        else:
            block, rows = pl.ds(q_start, bq), None
        q_doc = None if r.q_doc is None or not masked else query_column(r.q_doc, (block,), rows, other=-1)

        def work(carry):
            dk, dv, dgate = carry
            q = tiles.load(r.q, (block, g, slice(None)), rows=rows, cols=plan.cols(0))
            do = tiles.load(do_ref, (block, g, slice(None)), rows=rows, cols=plan.cols(1))
            lse = query_column(lse_ref, (block, g), rows, other=jnp.inf)
            s, gated = tiles.logits(plan, q, k, i, j, gate, q_doc, k_doc if masked else None, masked=masked,
                                    k_pos=k_pos, q_start=q_start)
            p = tiles.exp_of(plan)(s - tiles.in_logit_base(plan, lse))
            dv = dv + tiles.dot(p.astype(do.dtype), do, contract=(0, 0))
            ds = p * (tiles.dot(do, v, contract=(1, 1)) - query_column(delta_ref, (block, g), rows))
            dk = dk + tiles.dot(ds.astype(q.dtype), q, contract=(0, 0))
            if dgate is not None:
                gated_ds = ds if gated is None else jnp.where(gated, ds, 0.0)
                dgate = dgate + jnp.sum(gated_ds, axis=0, keepdims=True)
            return dk, dv, dgate

        return tiles.when_documents_meet(q_doc, k_doc, work, carry) if masked else work(carry)

    def head(g, carry):
        return tiles.edge_then_inner(lo, a, b, hi, functools.partial(query_block, g), carry)

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32),
            None if gate is None else jnp.zeros(gate.shape, jnp.float32))
    dk, dv, dgate = lax.fori_loop(0, plan.group, head, init)
    dk = dk * plan.scale
    if plan.kv_shared:
        dk = dk + dv
    else:
        tiles.store(dv_ref, dv.astype(dv_ref.dtype), rows=key_rows, cols=plan.cols(1))
    tiles.store(dk_ref, dk.astype(dk_ref.dtype), rows=key_rows, cols=plan.cols(0))
    if dgate_ref is not None:
        tiles.store(dgate_ref, jnp.squeeze(dgate, 0).astype(dgate_ref.dtype), rows=key_rows)


def _column_specs(plan: Plan, ranges_width: int):
    """Block specs of (q, k, [v], [gate], [q_doc, k_doc], [k_pos, ranges]) for a grid (batch, kv head, key
    block) over the op's layout: all query rows of the group's heads, one key block."""
    bk = plan.block_k
    specs = [group_rows(plan, plan.tile_dims[0]), key_block(plan, plan.tile_dims[0])]
    if not plan.kv_shared:
        specs.append(key_block(plan, plan.tile_dims[1]))
    if plan.has_gate:
        specs.append(key_block(plan))
    if plan.has_segments:
        specs += [pl.BlockSpec((None, plan.t), lambda b, h, j: (b, 0)),
                  key_block(plan) if plan.compact else pl.BlockSpec((None, bk), lambda b, h, j: (b, j))]
    if plan.compact:
        specs += [key_block(plan), pl.BlockSpec((None, None, 2, ranges_width), lambda b, h, j: (b, h, 0, 0))]
    return specs


def group_rows(plan: Plan, width: int | None = None):
    """The spec of every row of kv head h's query heads in a [B,T,Hq,width] array ([B,T,Hq] when width is
    None) for a grid (batch, kv head, key block)."""
    if width is None:
        return pl.BlockSpec((None, plan.t, plan.group), lambda b, h, j: (b, 0, h))
    return pl.BlockSpec((None, plan.t, plan.group, width), lambda b, h, j: (b, 0, h, 0))


def key_block(plan: Plan, width: int | None = None):
    """The spec of key block j of kv head h in a [B,S,Hkv,width] array, or a [B,S,Hkv] row (width None)."""
    if width is None:
        return pl.BlockSpec((None, plan.block_k, None), lambda b, h, j: (b, j, h))
    return pl.BlockSpec((None, plan.block_k, None, width), lambda b, h, j: (b, j, h, 0))


def backward(plan: Plan, q, k, v, gate, q_doc, k_doc, o, lse, do, k_pos=None, ranges=None, key_ranges=None):
    """Gradients (dq, dk, dv, dgate) in the inputs' layouts and dtypes (dv None when v is None: it is added into
    dk), read and written in place as `forward`'s; lse [B,T,Hq] from it. Compact keys bring k_pos, the forward's
    ranges and key_ranges [B,Hkv,2,n]: per key block, the query blocks that see it."""
    B, _, Hq, _ = q.shape
    Hkv = k.shape[2]
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    inputs = [x for x in (q, k, v, gate, q_doc, k_doc) if x is not None]
    width = lambda x: 0 if x is None else x.shape[-1]  # noqa: E731
    d, dv = plan.tile_dims
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan), out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(B, Hq, plan.num_q_blocks),
        in_specs=row_specs(plan, width(ranges)) + [query_block(plan, dv), query_block(plan), query_block(plan)],
        out_specs=query_block(plan, d), interpret=plan.interpret, compiler_params=compiler_params(plan, "dq"),
        name="flash_dq",
    )(*inputs, *([k_pos, ranges] if plan.compact else []), do, lse, delta)

    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype)]
    out_specs = [key_block(plan, d)]
    if v is not None:
        out_shape.append(jax.ShapeDtypeStruct(v.shape, v.dtype))
        out_specs.append(key_block(plan, dv))
    if gate is not None:
        out_shape.append(jax.ShapeDtypeStruct(gate.shape, gate.dtype))
        out_specs.append(key_block(plan))
    outs = pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan), out_shape=out_shape, grid=(B, Hkv, plan.num_k_blocks),
        in_specs=_column_specs(plan, width(key_ranges)) + [group_rows(plan, dv), group_rows(plan), group_rows(plan)],
        out_specs=out_specs, interpret=plan.interpret, compiler_params=compiler_params(plan, "dkv"), name="flash_dkv",
    )(*inputs, *([k_pos, key_ranges] if plan.compact else []), do, lse, delta)
    outs = list(outs)
    dk = outs.pop(0)
    dv = None if v is None else outs.pop(0)
    dgate = outs.pop(0) if gate is not None else None
    return dq, dk, dv, dgate
