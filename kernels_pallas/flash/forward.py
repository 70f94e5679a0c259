"""Flash-attention forward: grid (batch, query head, query block), a loop over only the key blocks the masks
leave visible, online softmax in fp32; writes the output and the row log-sum-exp (+inf for a row that sees
no key, so the backward's exp(s - lse) is an exact 0 there)."""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import platform
from kernels_pallas.flash import tiles
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
    k_pos, ranges = (next(it), next(it)) if plan.compact else (None, None)
    return Refs(q, k, v, gate, q_doc, k_doc, k_pos, ranges), list(it)


def kv_bounds(plan: Plan, r: Refs, i):
    """[lo, hi) of the key blocks query block i loops over: the masks' span, or the compact ranges."""
    return (tiles.pick(r.ranges, 0, i), tiles.pick(r.ranges, 1, i)) if plan.compact else plan.kv_range(i)


def _forward_kernel(*refs, plan: Plan):
    r, (o_ref, lse_ref) = unpack(plan, refs)
    i = pl.program_id(2)
    q = r.q[...]
    q_doc = None if r.q_doc is None else r.q_doc[...]
    bq, bk = plan.block_q, plan.block_k

    def body(j, carry):
        keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k_doc = None if r.k_doc is None else r.k_doc[:, keys]

        def work(carry):
            m, l, acc = carry
            k = r.k[keys, :]
            v = k if plan.kv_shared else r.v[keys, :]
            gate = None if r.gate is None else r.gate[:, keys]
            k_pos = None if r.k_pos is None else r.k_pos[:, keys]
            s, _ = tiles.logits(plan, q, k, i, j, gate, q_doc, k_doc, k_pos=k_pos)
            return tiles.online_softmax_step(m, l, acc, s, v)

        return tiles.when_documents_meet(q_doc, k_doc, work, carry)

    init = (jnp.full((bq, 1), -jnp.inf, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
            jnp.zeros((bq, o_ref.shape[-1]), jnp.float32))
    m, l, acc = lax.fori_loop(*kv_bounds(plan, r, i), body, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), jnp.inf)


def row_specs(plan: Plan, d: int, dv: int, ranges_width: int = 0):
    """Block specs of (q, k, [v], [gate], [q_doc, k_doc], [k_pos, ranges]) for a grid (batch, query head, query
    block): a query block of one head, and the whole key/value rows of its kv head, h // group (read by index,
    so GQA never repeats K or V). Compact keys carry document ids per kv head."""
    G = plan.group

    def per_kv_head(rows, cols):
        return pl.BlockSpec((None, None, rows, cols), lambda b, h, i: (b, h // G, 0, 0))

    specs = [pl.BlockSpec((None, None, plan.block_q, d), lambda b, h, i: (b, h, i, 0)), per_kv_head(plan.s_pad, d)]
    if not plan.kv_shared:
        specs.append(per_kv_head(plan.s_pad, dv))
    if plan.has_gate:
        specs.append(per_kv_head(1, plan.s_pad))
    if plan.has_segments:
        specs += [pl.BlockSpec((None, plan.block_q, 1), lambda b, h, i: (b, i, 0)),
                  per_kv_head(1, plan.s_pad) if plan.compact
                  else pl.BlockSpec((None, 1, plan.s_pad), lambda b, h, i: (b, 0, 0))]
    if plan.compact:
        specs += [per_kv_head(1, plan.s_pad), per_kv_head(2, ranges_width)]
    return specs


def compiler_params(plan: Plan, grid_rank: int = 3):
    return platform.compiler_params(gpu=dict(num_warps=plan.num_warps, num_stages=plan.num_stages),
                                    tpu=dict(dimension_semantics=("parallel",) * grid_rank))


def forward(plan: Plan, q, k, v, gate, q_doc, k_doc, k_pos=None, ranges=None):
    """q [B,Hq,Tp,D], k [B,Hkv,Sp,D], v [B,Hkv,Sp,Dv] or None (v is k), gate [B,Hkv,1,Sp] fp32 or None,
    q_doc [B,Tp,1], k_doc [B,1,Sp] (compact keys: [B,Hkv,1,Sp]) int32 or None; compact keys' k_pos [B,Hkv,1,Sp]
    and ranges [B,Hkv,2,n] int32 -> (o [B,Hq,Tp,Dv], lse [B,Hq,Tp,1] fp32)."""
    B, Hq, Tp, D = q.shape
    Dv = D if v is None else v.shape[-1]
    inputs = [x for x in (q, k, v, gate, q_doc, k_doc, k_pos, ranges) if x is not None]
    shapes = (jax.ShapeDtypeStruct((B, Hq, Tp, Dv), q.dtype), jax.ShapeDtypeStruct((B, Hq, Tp, 1), jnp.float32))
    out_spec = [pl.BlockSpec((None, None, plan.block_q, Dv), lambda b, h, i: (b, h, i, 0)),
                pl.BlockSpec((None, None, plan.block_q, 1), lambda b, h, i: (b, h, i, 0))]
    return pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan), out_shape=shapes, grid=(B, Hq, plan.num_q_blocks),
        in_specs=row_specs(plan, D, Dv, 0 if ranges is None else ranges.shape[-1]), out_specs=out_spec,
        interpret=plan.interpret, compiler_params=compiler_params(plan), name="flash_forward",
    )(*inputs)
