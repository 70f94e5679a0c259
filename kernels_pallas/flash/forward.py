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


def kv_loop(plan: Plan, r: Refs, i, q, q_doc, tile, carry):
    """Carry through the key blocks that query block i sees, tile(k, v, logits, carry) -> carry on each: the
    masked tiles at the ends of the range, then the fully visible ones between them without a mask."""
    lo, hi = kv_bounds(plan, r, i)
    a, b = (hi, hi) if plan.compact else plan.full_kv_range(i)
    bk = plan.block_k

    def step(masked, j, carry):
        keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k_doc = None if r.k_doc is None or not masked else r.k_doc[:, keys]

        def work(carry):
            k = r.k[keys, :]
            v = k if plan.kv_shared else r.v[keys, :]
            gate = None if r.gate is None else r.gate[:, keys]
            k_pos = None if r.k_pos is None else r.k_pos[:, keys]
            s, _ = tiles.logits(plan, q, k, i, j, gate, q_doc if masked else None, k_doc, masked=masked,
                                k_pos=k_pos)
            return tile(k, v, s, carry)

        return tiles.when_documents_meet(q_doc, k_doc, work, carry) if masked else work(carry)

    return tiles.edge_then_inner(lo, a, b, hi, step, carry)


def _forward_kernel(*refs, plan: Plan):
    r, (o_ref, lse_ref) = unpack(plan, refs)
    i = plan.q_order(pl.program_id(2))
    bq = plan.block_q
    q_doc = None if r.q_doc is None else r.q_doc[...]

    def tile(k, v, s, carry):
        return tiles.online_softmax_step(*carry, s, v, exp=tiles.exp_of(plan))

    init = (jnp.full((bq, 1), -jnp.inf, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
            jnp.zeros((bq, o_ref.shape[-1]), jnp.float32))
    m, l, acc = kv_loop(plan, r, i, r.q[...], q_doc, tile, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, tiles.lse_of(plan, m, l_safe), jnp.inf)


def row_specs(plan: Plan, d: int, dv: int, ranges_width: int = 0):
    """Block specs of (q, k, [v], [gate], [q_doc, k_doc], [k_pos, ranges]) for a grid (batch, query head, query
    block): a query block of one head, and the whole key/value rows of its kv head, h // group (read by index,
    so GQA never repeats K or V). Compact keys carry document ids per kv head."""
    G = plan.group

    def per_kv_head(rows, cols):
        return pl.BlockSpec((None, None, rows, cols), lambda b, h, i: (b, h // G, 0, 0))

    specs = [pl.BlockSpec((None, None, plan.block_q, d), lambda b, h, i: (b, h, plan.q_order(i), 0)),
             per_kv_head(plan.s_pad, d)]
    if not plan.kv_shared:
        specs.append(per_kv_head(plan.s_pad, dv))
    if plan.has_gate:
        specs.append(per_kv_head(1, plan.s_pad))
    if plan.has_segments:
        specs += [pl.BlockSpec((None, plan.block_q, 1), lambda b, h, i: (b, plan.q_order(i), 0)),
                  per_kv_head(1, plan.s_pad) if plan.compact
                  else pl.BlockSpec((None, 1, plan.s_pad), lambda b, h, i: (b, 0, 0))]
    if plan.compact:
        specs += [per_kv_head(1, plan.s_pad), per_kv_head(2, ranges_width)]
    return specs


KERNELS = ("forward", "dq", "dkv")


def compiler_params(plan: Plan, kernel: str):
    """The target's parameters for one row-driver kernel: its Triton warps and stages (plan.launch), or every
    grid axis parallel on TPU."""
    warps, stages = plan.launch[KERNELS.index(kernel)]
    return platform.compiler_params(gpu=dict(num_warps=warps, num_stages=stages),
                                    tpu=dict(dimension_semantics=("parallel",) * 3))


def forward(plan: Plan, q, k, v, gate, q_doc, k_doc, k_pos=None, ranges=None):
    """q [B,Hq,Tp,D], k [B,Hkv,Sp,D], v [B,Hkv,Sp,Dv] or None (v is k), gate [B,Hkv,1,Sp] fp32 or None,
    q_doc [B,Tp,1], k_doc [B,1,Sp] (compact keys: [B,Hkv,1,Sp]) int32 or None; compact keys' k_pos [B,Hkv,1,Sp]
    and ranges [B,Hkv,2,n] int32 -> (o [B,Hq,Tp,Dv], lse [B,Hq,Tp,1] fp32)."""
    B, Hq, Tp, D = q.shape
    Dv = D if v is None else v.shape[-1]
    inputs = [x for x in (q, k, v, gate, q_doc, k_doc, k_pos, ranges) if x is not None]
    shapes = (jax.ShapeDtypeStruct((B, Hq, Tp, Dv), q.dtype), jax.ShapeDtypeStruct((B, Hq, Tp, 1), jnp.float32))
    out_spec = [pl.BlockSpec((None, None, plan.block_q, Dv), lambda b, h, i: (b, h, plan.q_order(i), 0)),
                pl.BlockSpec((None, None, plan.block_q, 1), lambda b, h, i: (b, h, plan.q_order(i), 0))]
    return pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan), out_shape=shapes, grid=(B, Hq, plan.num_q_blocks),
        in_specs=row_specs(plan, D, Dv, 0 if ranges is None else ranges.shape[-1]), out_specs=out_spec,
        interpret=plan.interpret, compiler_params=compiler_params(plan, "forward"), name="flash_forward",
    )(*inputs)
