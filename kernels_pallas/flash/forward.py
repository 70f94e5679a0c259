"""Flash-attention forward: grid (batch, query head, query block), a loop over only the key blocks the masks
leave visible, online softmax in fp32; writes the output and the row log-sum-exp (+inf for a row that sees
no key, so the backward's exp(s - lse) is an exact 0 there)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import platform
from kernels_pallas.flash import tiles
from kernels_pallas.flash.tiles import Plan


def _unpack(plan: Plan, refs):
    """(q, k, v, gate, q_doc, k_doc) refs of a kernel's inputs (v is k's ref when they are one array; the
    optional ones None when absent), and the remaining (output) refs."""
    it = iter(refs)
    q_ref, k_ref = next(it), next(it)
    v_ref = k_ref if plan.kv_shared else next(it)
    gate_ref = next(it) if plan.has_gate else None
    q_doc_ref, k_doc_ref = (next(it), next(it)) if plan.has_segments else (None, None)
    return (q_ref, k_ref, v_ref, gate_ref, q_doc_ref, k_doc_ref), list(it)


def _forward_kernel(*refs, plan: Plan):
    (q_ref, k_ref, v_ref, gate_ref, q_doc_ref, k_doc_ref), (o_ref, lse_ref) = _unpack(plan, refs)
    i = pl.program_id(2)
    q = q_ref[...]
    q_doc = None if q_doc_ref is None else q_doc_ref[...]
    bq, bk = plan.block_q, plan.block_k

    def body(j, carry):
        keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k_doc = None if k_doc_ref is None else k_doc_ref[:, keys]

        def work(carry):
            m, l, acc = carry
            k = k_ref[keys, :]
            v = k if plan.kv_shared else v_ref[keys, :]
            gate = None if gate_ref is None else gate_ref[:, keys]
            s, _ = tiles.logits(plan, q, k, i, j, gate, q_doc, k_doc)
            return tiles.online_softmax_step(m, l, acc, s, v)

        return tiles.when_documents_meet(q_doc, k_doc, work, carry)

    init = (jnp.full((bq, 1), -jnp.inf, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
            jnp.zeros((bq, o_ref.shape[-1]), jnp.float32))
    m, l, acc = lax.fori_loop(*plan.kv_range(i), body, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), jnp.inf)


def row_specs(plan: Plan, d: int, dv: int):
    """Block specs of (q, k, [v], [gate], [q_doc, k_doc]) for a grid (batch, query head, query block): a
    query block of one head, and the whole key/value rows of its kv head, h // group (read by index, so
    GQA never repeats K or V)."""
    G = plan.group
    specs = [pl.BlockSpec((None, None, plan.block_q, d), lambda b, h, i: (b, h, i, 0)),
             pl.BlockSpec((None, None, plan.s_pad, d), lambda b, h, i: (b, h // G, 0, 0))]
    if not plan.kv_shared:
        specs.append(pl.BlockSpec((None, None, plan.s_pad, dv), lambda b, h, i: (b, h // G, 0, 0)))
    if plan.has_gate:
        specs.append(pl.BlockSpec((None, None, 1, plan.s_pad), lambda b, h, i: (b, h // G, 0, 0)))
    if plan.has_segments:
        specs += [pl.BlockSpec((None, plan.block_q, 1), lambda b, h, i: (b, i, 0)),
                  pl.BlockSpec((None, 1, plan.s_pad), lambda b, h, i: (b, 0, 0))]
    return specs


def compiler_params(plan: Plan, grid_rank: int = 3):
    return platform.compiler_params(gpu=dict(num_warps=plan.num_warps, num_stages=plan.num_stages),
                                    tpu=dict(dimension_semantics=("parallel",) * grid_rank))


def forward(plan: Plan, q, k, v, gate, q_doc, k_doc):
    """q [B,Hq,Tp,D], k [B,Hkv,Sp,D], v [B,Hkv,Sp,Dv] or None (v is k), gate [B,Hkv,1,Sp] fp32 or None,
    q_doc [B,Tp,1], k_doc [B,1,Sp] int32 or None -> (o [B,Hq,Tp,Dv], lse [B,Hq,Tp,1] fp32)."""
    B, Hq, Tp, D = q.shape
    Dv = D if v is None else v.shape[-1]
    inputs = [x for x in (q, k, v, gate, q_doc, k_doc) if x is not None]
    shapes = (jax.ShapeDtypeStruct((B, Hq, Tp, Dv), q.dtype), jax.ShapeDtypeStruct((B, Hq, Tp, 1), jnp.float32))
    out_spec = [pl.BlockSpec((None, None, plan.block_q, Dv), lambda b, h, i: (b, h, i, 0)),
                pl.BlockSpec((None, None, plan.block_q, 1), lambda b, h, i: (b, h, i, 0))]
    return pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan), out_shape=shapes, grid=(B, Hq, plan.num_q_blocks),
        in_specs=row_specs(plan, D, Dv), out_specs=out_spec, interpret=plan.interpret,
        compiler_params=compiler_params(plan), name="flash_forward",
    )(*inputs)
