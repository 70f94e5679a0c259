"""Flash-attention backward, two kernels that recompute the probabilities from the saved lse:

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

from kernels_pallas.flash import tiles
from kernels_pallas.flash.forward import compiler_params, kv_loop, row_specs, unpack
from kernels_pallas.flash.tiles import Plan


def _dq_kernel(*refs, plan: Plan):
    r, (do_ref, lse_ref, delta_ref, dq_ref) = unpack(plan, refs)
    i = plan.q_order(pl.program_id(2))
    do, delta = do_ref[...], delta_ref[...]
    lse = tiles.in_logit_base(plan, lse_ref[...])
    q_doc = None if r.q_doc is None else r.q_doc[...]

    def tile(k, v, s, dq):
        p = tiles.exp_of(plan)(s - lse)
        ds = p * (tiles.dot(do, v, contract=(1, 1)) - delta)
        return dq + tiles.dot(ds.astype(k.dtype), k)

    dq = kv_loop(plan, r, i, r.q[...], q_doc, tile, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, plan: Plan):
    r, outs = unpack(plan, refs)
    do_ref, lse_ref, delta_ref, *outs = outs
    dk_ref = outs.pop(0)
    dv_ref = None if plan.kv_shared else outs.pop(0)
    dgate_ref = outs.pop(0) if plan.has_gate else None
    j = pl.program_id(2)
    k = r.k[...]
    v = k if plan.kv_shared else r.v[...]
    gate = None if r.gate is None else r.gate[...]
    k_doc = None if r.k_doc is None else r.k_doc[...]
    k_pos = None if r.k_pos is None else r.k_pos[...]
    bq = plan.block_q
    if plan.compact:
        lo, hi = tiles.pick(r.ranges, 0, j), tiles.pick(r.ranges, 1, j)
        a, b = hi, hi
    else:
        (lo, hi), (a, b) = plan.q_range(j), plan.full_q_range(j)

    def query_block(g, masked, i, carry):
        rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
        q_doc = None if r.q_doc is None or not masked else r.q_doc[rows, :]

        def work(carry):
            dk, dv, dgate = carry
            q, do = r.q[g, rows, :], do_ref[g, rows, :]
            s, gated = tiles.logits(plan, q, k, i, j, gate, q_doc, k_doc if masked else None, masked=masked,
                                    k_pos=k_pos)
            p = tiles.exp_of(plan)(s - tiles.in_logit_base(plan, lse_ref[g, rows, :]))
            dv = dv + tiles.dot(p.astype(do.dtype), do, contract=(0, 0))
            ds = p * (tiles.dot(do, v, contract=(1, 1)) - delta_ref[g, rows, :])
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
        dk_ref[...] = (dk + dv).astype(dk_ref.dtype)
    else:
        dk_ref[...] = dk.astype(dk_ref.dtype)
        dv_ref[...] = dv.astype(dv_ref.dtype)
    if dgate_ref is not None:
        dgate_ref[...] = dgate


def _column_specs(plan: Plan, d: int, dv: int, ranges_width: int):
    """Block specs of (q, k, [v], [gate], [q_doc, k_doc], [k_pos, ranges]) for a grid (batch, kv head, key
    block): all query rows of the group's heads, one key block."""
    G, bk = plan.group, plan.block_k
    key_row = pl.BlockSpec((None, None, 1, bk), lambda b, h, j: (b, h, 0, j))
    specs = [pl.BlockSpec((None, G, plan.t_pad, d), lambda b, h, j: (b, h, 0, 0)),
             pl.BlockSpec((None, None, bk, d), lambda b, h, j: (b, h, j, 0))]
    if not plan.kv_shared:
        specs.append(pl.BlockSpec((None, None, bk, dv), lambda b, h, j: (b, h, j, 0)))
    if plan.has_gate:
        specs.append(key_row)
    if plan.has_segments:
        specs += [pl.BlockSpec((None, plan.t_pad, 1), lambda b, h, j: (b, 0, 0)),
                  key_row if plan.compact else pl.BlockSpec((None, 1, bk), lambda b, h, j: (b, 0, j))]
    if plan.compact:
        specs += [key_row, pl.BlockSpec((None, None, 2, ranges_width), lambda b, h, j: (b, h, 0, 0))]
    return specs


def backward(plan: Plan, q, k, v, gate, q_doc, k_doc, o, lse, do, k_pos=None, ranges=None, key_ranges=None):
    """Gradients (dq, dk, dv, dgate) in the input dtypes (dv None when v is None: it is added into dk;
    dgate fp32 [B,Hkv,1,Sp] or None). Compact keys bring k_pos, the forward's ranges and key_ranges [B,Hkv,2,n]:
    per key block, the query blocks that see it."""
    B, Hq, Tp, D = q.shape
    Hkv, Sp = k.shape[1], k.shape[2]
    Dv = D if v is None else v.shape[-1]
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
    inputs = [x for x in (q, k, v, gate, q_doc, k_doc) if x is not None]
    width = lambda x: 0 if x is None else x.shape[-1]  # noqa: E731
    bq = plan.block_q
    row = lambda width: pl.BlockSpec((None, None, bq, width), lambda b, h, i: (b, h, plan.q_order(i), 0))  # noqa: E731
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan), out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(B, Hq, plan.num_q_blocks), in_specs=row_specs(plan, D, Dv, width(ranges)) + [row(Dv), row(1), row(1)],
        out_specs=row(D), interpret=plan.interpret, compiler_params=compiler_params(plan, "dq"), name="flash_dq",
    )(*inputs, *([k_pos, ranges] if plan.compact else []), do, lse, delta)

    G, bk = plan.group, plan.block_k
    whole = lambda width: pl.BlockSpec((None, G, Tp, width), lambda b, h, j: (b, h, 0, 0))  # noqa: E731
    column = lambda width: pl.BlockSpec((None, None, bk, width), lambda b, h, j: (b, h, j, 0))  # noqa: E731
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype)]
    out_specs = [column(D)]
    if v is not None:
        out_shape.append(jax.ShapeDtypeStruct(v.shape, v.dtype))
        out_specs.append(column(Dv))
    if gate is not None:
        out_shape.append(jax.ShapeDtypeStruct((B, Hkv, 1, Sp), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, 1, bk), lambda b, h, j: (b, h, 0, j)))
    outs = pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan), out_shape=out_shape, grid=(B, Hkv, plan.num_k_blocks),
        in_specs=_column_specs(plan, D, Dv, width(key_ranges)) + [whole(Dv), whole(1), whole(1)],
        out_specs=out_specs, interpret=plan.interpret, compiler_params=compiler_params(plan, "dkv"), name="flash_dkv",
    )(*inputs, *([k_pos, key_ranges] if plan.compact else []), do, lse, delta)
    outs = list(outs)
    dk = outs.pop(0)
    dv = None if v is None else outs.pop(0)
    dgate = outs.pop(0) if gate is not None else None
    return dq, dk, dv, dgate
