"""Flash-attention forward of the row driver: grid (batch, query head, query block), a loop over only the key
blocks the masks leave visible, online softmax in fp32; writes the output and the row log-sum-exp (+inf for a row
that sees no key, so the backward's exp(s - lse) is an exact 0 there).

The row driver reads and writes the op's layout in place ([B,T,H,D] blocks with the heads squeezed): no
transposed or padded copy of q, k, v or o goes through HBM. Ragged T and S end in a partial block, whose loads
past the end are masked (`tiles.load`) and whose stores past the end are dropped (`tiles.store`); on Triton the
tiles are powers of two wide and their columns past the head dim are masked the same way."""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import platform
from kernels_pallas.flash import compact, tiles
from kernels_pallas.flash.tiles import Plan


class Refs(NamedTuple):
    """A flash kernel's input refs (v is k's ref when they are one array; the optional ones None when absent):
    compact keys add their positions [1, S] and their ranges table [2, n] (`compact.block_ranges`)."""

    q: Any
    k: Any
    v: Any
    gate: Any
    q_doc: Any
    k_doc: Any
    k_pos: Any
    ranges: Any


def unpack(plan: Plan, refs) -> tuple[Refs, list]:
    """The inputs (q, k, [v], [gate], [q_doc, k_doc], [k_pos, ranges]) of a kernel's refs, and the rest."""
    it = iter(refs)
    q, k = next(it), next(it)
    v = k if plan.kv_shared else next(it)
    gate = next(it) if plan.has_gate else None
    q_doc, k_doc = (next(it), next(it)) if plan.has_segments else (None, None)
    # The TPU pipeline prefetches the ranges into SMEM instead (`blocks.Ranges`).
    k_pos, ranges = (next(it), None if plan.pipeline else next(it)) if plan.compact else (None, None)
    return Refs(q, k, v, gate, q_doc, k_doc, k_pos, ranges), list(it)


def kv_bounds(plan: Plan, r: Refs, i):
    """[lo, hi) of the key blocks query block i loops over: the masks' span, or the compact ranges."""
    return (tiles.pick(r.ranges, 0, i), tiles.pick(r.ranges, 1, i)) if plan.compact else plan.kv_range(i)


def key_row(ref, index, rows, other=0):
    """A per-key row (gate, document ids, compact positions) of a key tile as [1, bk]."""
    return jnp.expand_dims(tiles.load(ref, index, rows=rows, other=other), 0)


def query_column(ref, index, rows, other=0):
    """A per-query row (document ids, lse, delta) of a query tile as a column [bq, 1]."""
    return jnp.expand_dims(tiles.load(ref, index, rows=rows, other=other), 1)


def kv_loop(plan: Plan, r: Refs, i, q, q_doc, tile, carry):
    """Carry through the key blocks that query block i sees, tile(k, v, logits, carry) -> carry on each: the
    masked tiles at the ends of the range, then the fully visible ones between them without a mask (they hold no
    key past S either, so their loads need no bound)."""
    lo, hi = kv_bounds(plan, r, i)
    a, b = (hi, hi) if plan.compact else plan.full_kv_range(i)
    bk = plan.block_k

    def step(masked, j, carry):
        keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
        rows = plan.key_rows(j, masked)
        k_doc = None if r.k_doc is None or not masked else key_row(r.k_doc, (keys,), rows, other=-1)

        def work(carry):
            k = tiles.load(r.k, (keys, slice(None)), rows=rows, cols=plan.cols(0))
            v = k if plan.kv_shared else tiles.load(r.v, (keys, slice(None)), rows=rows, cols=plan.cols(1))
            gate = None if r.gate is None else key_row(r.gate, (keys,), rows).astype(jnp.float32)
            k_pos = None if r.k_pos is None else key_row(r.k_pos, (keys,), rows, other=compact.FAR)
            s, _ = tiles.logits(plan, q, k, i, j, gate, q_doc if masked else None, k_doc, masked=masked,
                                k_pos=k_pos)
            return tile(k, v, s, carry)

        return tiles.when_documents_meet(q_doc, k_doc, work, carry) if masked else work(carry)

    return tiles.edge_then_inner(lo, a, b, hi, step, carry)


def _forward_kernel(*refs, plan: Plan):
    r, (o_ref, lse_ref) = unpack(plan, refs)
    i = plan.q_order(pl.program_id(2))
    bq, rows = plan.block_q, plan.query_rows(i)
    q = tiles.load(r.q, rows=rows, cols=plan.cols(0))
    q_doc = None if r.q_doc is None else query_column(r.q_doc, (), rows, other=-1)

    def tile(k, v, s, carry):
        return tiles.online_softmax_step(*carry, s, v, exp=tiles.exp_of(plan))

    init = (jnp.full((bq, 1), -jnp.inf, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
            jnp.zeros((bq, plan.tile_dims[1]), jnp.float32))
    m, l, acc = kv_loop(plan, r, i, q, q_doc, tile, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    tiles.store(o_ref, (acc / l_safe).astype(o_ref.dtype), rows=rows, cols=plan.cols(1))
    tiles.store(lse_ref, jnp.squeeze(jnp.where(seen, tiles.lse_of(plan, m, l_safe), jnp.inf), 1), rows=rows)


def row_specs(plan: Plan, ranges_width: int = 0):
    """Block specs of (q, k, [v], [gate], [q_doc, k_doc], [k_pos, ranges]) for a grid (batch, query head, query
    block) over the op's layout (q [B,T,Hq,D], keys [B,S,Hkv,D], per-key rows [B,S,Hkv], documents [B,T]): a
    query block of one head, and the whole key/value rows of its kv head, h // group (read by index, so GQA
    never repeats K or V). Compact keys carry document ids per kv head."""
    G, bq = plan.group, plan.block_q
    key_rows = pl.BlockSpec((None, plan.s, None), lambda b, h, i: (b, 0, h // G))

    def per_kv_head(width):
        return pl.BlockSpec((None, plan.s, None, width), lambda b, h, i: (b, 0, h // G, 0))

    specs = [query_block(plan, plan.tile_dims[0]), per_kv_head(plan.tile_dims[0])]
    if not plan.kv_shared:
        specs.append(per_kv_head(plan.tile_dims[1]))
    if plan.has_gate:
        specs.append(key_rows)
    if plan.has_segments:
        specs += [pl.BlockSpec((None, bq), lambda b, h, i: (b, plan.q_order(i))),
                  key_rows if plan.compact else pl.BlockSpec((None, plan.s), lambda b, h, i: (b, 0))]
    if plan.compact:
        specs += [key_rows, pl.BlockSpec((None, None, 2, ranges_width), lambda b, h, i: (b, h // G, 0, 0))]
    return specs


def query_block(plan: Plan, width: int | None = None):
    """The spec of query block q_order(i) of head h in a [B,T,Hq,width] array, or a [B,T,Hq] row (width None)."""
    if width is None:
        return pl.BlockSpec((None, plan.block_q, None), lambda b, h, i: (b, plan.q_order(i), h))
    return pl.BlockSpec((None, plan.block_q, None, width), lambda b, h, i: (b, plan.q_order(i), h, 0))


KERNELS = ("forward", "dq", "dkv")


def compiler_params(plan: Plan, kernel: str):
    """The target's parameters for one row-driver kernel: its Triton warps and stages (plan.launch)."""
    warps, stages = plan.launch[KERNELS.index(kernel)]
    return platform.compiler_params(gpu=dict(num_warps=warps, num_stages=stages))


def forward(plan: Plan, q, k, v, gate, q_doc, k_doc, k_pos=None, ranges=None):
    """In the op's layout, read in place: q [B,T,Hq,D], k [B,S,Hkv,D], v [B,S,Hkv,Dv] or None (v is k), gate
    [B,S,Hkv] or None, q_doc [B,T] and k_doc [B,S] (compact keys: [B,S,Hkv]) int32 document indices (>= 0) or
    None; compact keys' k_pos [B,S,Hkv] and ranges [B,Hkv,2,n] int32 -> (o [B,T,Hq,Dv], lse [B,T,Hq] fp32)."""
    B, T, Hq, _ = q.shape
    Dv = plan.head_dims[1]
    inputs = [x for x in (q, k, v, gate, q_doc, k_doc, k_pos, ranges) if x is not None]
    shapes = (jax.ShapeDtypeStruct((B, T, Hq, Dv), q.dtype), jax.ShapeDtypeStruct((B, T, Hq), jnp.float32))
    return pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan), out_shape=shapes, grid=(B, Hq, plan.num_q_blocks),
        in_specs=row_specs(plan, 0 if ranges is None else ranges.shape[-1]),
        out_specs=[query_block(plan, plan.tile_dims[1]), query_block(plan)],
        interpret=plan.interpret, compiler_params=compiler_params(plan, "forward"), name="flash_forward",
    )(*inputs)
