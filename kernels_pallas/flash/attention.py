"""`flash_attention`: the Pallas flash-attention entry point in the op's layout, joined to its backward.

Takes the `softmax_attention` layout (q [B,T,Hq,D], k [B,S,Hkv,D], v [B,S,Hkv,Dv] or None when one array is
both key and value). Two drivers, each with its layout (`layouts`):

- the portable row driver (forward.py, backward.py: a loop over key blocks inside each program; CPU interpret
  and Triton) reads and writes the op's arrays in place, ragged T and S masked inside the kernels;
- the TPU key-block pipeline (pipeline.py: the loop is a sequential grid axis, VMEM per grid step independent
  of T), which every TPU build uses, reads heads-first copies zero-padded to whole blocks.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kernels_pallas import platform
from kernels_pallas.flash import backward as rows_backward
from kernels_pallas.flash import forward as rows_forward
from kernels_pallas.flash import compact, gpu_tiles, layouts, pipeline
from kernels_pallas.flash import tiles as tiles_lib
from kernels_pallas.flash.tiles import Plan

# (block_q, block_k) per target. cpu: interpret mode, where fewer and larger tiles run faster; tpu: 512-row
# blocks, which the pipeline keeps at a few MiB of VMEM per grid step (pipeline.vmem_estimate), unmeasured.
# GPU tiles (blocks, and each kernel's warps and stages) come from the per-chip table in gpu_tiles.json.
BLOCKS = {"cpu": (128, 128), "tpu": (512, 512)}
# Triton launch parameters where no GPU is targeted (interpret mode ignores them): (num_warps, num_stages) of the
# forward, dq and dk/dv kernels.
LAUNCH = ((4, 2), (4, 2), (4, 2))
# The smallest block a target accepts: Triton's dots need 16 rows; TPU's blocks need 8 sublanes and 128 lanes.
MIN_BLOCK = {"cpu": (8, 8), "gpu": (16, 16), "tpu": (128, 128)}


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block(preferred: int, length: int, smallest: int) -> int:
    """The preferred tile, shrunk for short inputs to the next power of two >= length (not below smallest)."""
    return min(preferred, max(smallest, _pow2_at_least(length)))


def flash_attention(q, k, v=None, *, causal=True, sliding_window=None, local_window=None, key_log_gate=None,
                    doc_ids=None, scale=None, block_q=None, block_k=None, launch=None, interpret=None, driver=None):
    """Softmax attention with GQA, K=V (v None), windows, documents and the SP-KV key gate.

    Semantics are `attention.ops.softmax_attention`'s (bottom-right aligned positions; key_log_gate [B,S,Hkv]
    added to a key's logit when t - s >= local_window, or always when local_window is None; a row that sees no
    key gives 0) except that documents come as doc_ids [B,T]: sorted document indices from 0 (T == S). Inputs
    are not checked here: the op's API does that. driver: "rows" or "pipeline"; None takes the pipeline exactly
    when building for a TPU (tests run the pipeline interpreted on the CPU by naming it; the row driver's
    masked loads do not lower for TPU). block_q, block_k and launch (Triton's warps and stages per kernel)
    override the target's tiles.
    """
    tgt = platform.target()
    if driver not in (None, "rows", "pipeline"):
        raise ValueError(f"driver must be 'rows', 'pipeline' or None; got {driver!r}")
    use_pipeline = tgt == "tpu" if driver is None else driver == "pipeline"
    if tgt == "tpu" and not use_pipeline:
        raise ValueError("the row driver reads ragged blocks with masked loads, which Mosaic does not lower; "
                         "TPU builds take driver='pipeline' (or None)")
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    Dv = D if v is None else v.shape[-1]
    if tgt == "gpu":
        tiles = gpu_tiles.lookup(tiles_lib.device_kind(), max(D, Dv))
        (pref_q, pref_k), default_launch = (tiles.block_q, tiles.block_k), tiles.launch
    else:
        (pref_q, pref_k), default_launch = BLOCKS[tgt], LAUNCH
    min_q, min_k = MIN_BLOCK[tgt]
    bq = block_q or _block(pref_q, T, min_q)
    bk = block_k or _block(pref_k, S, min_k)
    # Triton wants power-of-two tiles of at least 16 along a dot's contraction: the tiles' columns past the head
    # dims read as zero, which changes no dot product, and are not written.
    width = (lambda n: max(16, _pow2_at_least(n))) if tgt == "gpu" and not use_pipeline else (lambda n: n)
    plan = Plan(t=T, s=S, t_pad=-(-T // bq) * bq, s_pad=-(-S // bk) * bk, block_q=bq, block_k=bk,
                group=Hq // Hkv, scale=float(D) ** -0.5 if scale is None else float(scale), causal=causal,
                sliding_window=sliding_window, local_window=local_window if key_log_gate is not None else None,
                has_gate=key_log_gate is not None, has_segments=doc_ids is not None, kv_shared=v is None,
                interpret=interpret if interpret is not None else platform.resolve_interpret(None),
                launch=tuple(launch or default_launch), pipeline=use_pipeline, exp2=not use_pipeline,
                head_dims=(D, Dv), tile_dims=(width(D), width(Dv)))
    lay = layouts.of(plan)
    ids = None if doc_ids is None else doc_ids.astype(jnp.int32)
    q_doc = None if ids is None else lay.documents(plan, ids, keys=False)
    k_doc = None if ids is None else lay.documents(plan, ids, keys=True)
    gate = None if key_log_gate is None else lay.key_rows(plan, key_log_gate, -jnp.inf)
    plans, parts = (plan,), ((lay.keys(plan, k), None if v is None else lay.keys(plan, v), gate, k_doc,
                              None, None, None),)
    if key_log_gate is not None and local_window is not None and causal:
        plans, parts = _spkv_parts(plan, k, v, key_log_gate, ids, parts[0], tgt)
    return lay.output(plan, _flash(plans, lay.queries(plan, q), q_doc, parts))


def _spkv_parts(plan: Plan, k, v, key_log_gate, ids, dense, tgt):
    """SP-KV as two key sets that share one softmax (`compact`): the local window's band of the dense keys
    (when local_window > 0; `dense` is their part) and the kept keys gathered into compact blocks with their
    positions, per-head document ids and loop ranges. (plans, parts) for `_flash`."""
    S = k.shape[1]
    lay = layouts.of(plan)
    index, position, _ = compact.kept_order(key_log_gate)
    far_doc = None
    if ids is not None:
        held = jnp.take_along_axis(ids[:, :, None], jnp.clip(position, 0, S - 1), axis=1)
        far_doc = lay.key_rows(plan, held, layouts.EDGE)
    # Triton reads the ranges tables as whole blocks: power-of-two widths.
    table = (lambda n: _pow2_at_least(n)) if tgt == "gpu" and not plan.pipeline else (lambda n: n)
    ranges, key_ranges = compact.block_ranges(
        position, t=plan.t, offset=plan.offset, block_q=plan.block_q, block_k=plan.block_k,
        local_window=plan.local_window, sliding_window=plan.sliding_window,
        widths=(table(plan.num_q_blocks), table(plan.num_k_blocks)))
    far = (lay.keys(plan, compact.gather(k, index, position)),
           None if v is None else lay.keys(plan, compact.gather(v, index, position)),
           lay.key_rows(plan, compact.gather(key_log_gate, index, position), -jnp.inf), far_doc,
           lay.key_rows(plan, position, compact.FAR), ranges, key_ranges)
    plans, parts = (dataclasses.replace(plan, compact=True),), (far,)
    if plan.local_window > 0:
        band = min(plan.local_window, plan.sliding_window or plan.local_window)
        plans = (dataclasses.replace(plan, sliding_window=band, has_gate=False, local_window=None),) + plans
        parts = (dense[:2] + (None,) + dense[3:],) + parts
    return plans, parts


# (forward, backward) of each driver, by plan.pipeline.
_DRIVERS = {False: (rows_forward.forward, rows_backward.backward), True: (pipeline.forward, pipeline.backward)}


def _merge(outs, lse_column):
    """(o, lse) of one softmax over the union of the parts' keys from each part's (o, lse): lse is their log-sum-
    exp, o their lse-weighted mean. An lse of +inf marks a row that saw no key (weight 0), as it does here.
    lse_column(lse) broadcasts an lse against its output (the driver's layout)."""
    lses = [jnp.where(lse == jnp.inf, -jnp.inf, lse) for _, lse in outs]
    lse = functools.reduce(jnp.logaddexp, lses)
    seen = lse > -jnp.inf
    shift = jnp.where(seen, lse, 0.0)
    o = sum(o_p.astype(jnp.float32) * jnp.exp(lse_column(l_p - shift)) for (o_p, _), l_p in zip(outs, lses))
    return o.astype(outs[0][0].dtype), jnp.where(seen, lse, jnp.inf)


def _forward(plans, q, q_doc, parts):
    outs = []
    for plan, (k, v, gate, k_doc, k_pos, ranges, _) in zip(plans, parts):
        extra = (k_pos, ranges) if plan.compact else ()
        outs.append(_DRIVERS[plan.pipeline][0](plan, q, k, v, gate, q_doc, k_doc, *extra))
    return outs[0] if len(outs) == 1 else _merge(outs, layouts.of(plans[0]).lse_column)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(plans, q, q_doc, parts):
    """Attention of q to the union of the parts' keys ((k, v, gate, k_doc, k_pos, ranges, key_ranges) each, one
    plan each) as one softmax: the parts' forwards merged by their lse, and each part's backward given the
    merged output and lse (its share of dq, and its dk, dv, dgate)."""
    return _forward(plans, q, q_doc, parts)[0]


def _flash_fwd(plans, q, q_doc, parts):
    o, lse = _forward(plans, q, q_doc, parts)
    return o, (q, q_doc, parts, o, lse)


def _flash_bwd(plans, res, do):
    q, q_doc, parts, o, lse = res
    dq, grads = None, []
    for plan, (k, v, gate, k_doc, k_pos, ranges, key_ranges) in zip(plans, parts):
        extra = dict(k_pos=k_pos, ranges=ranges, key_ranges=key_ranges) if plan.compact else {}
        dq_part, dk, dv, dgate = _DRIVERS[plan.pipeline][1](plan, q, k, v, gate, q_doc, k_doc, o, lse, do, **extra)
        dq = dq_part if dq is None else dq + dq_part
        grads.append((dk, dv, dgate, None, None, None, None))
    return dq, None, tuple(grads)


_flash.defvjp(_flash_fwd, _flash_bwd)
