"""`flash_attention`: the Pallas flash-attention entry point in the op's layout, joined to its backward.

Takes the `softmax_attention` layout (q [B,T,Hq,D], k [B,S,Hkv,D], v [B,S,Hkv,Dv] or None when one array is
both key and value), moves heads before time, zero-pads T and S to whole blocks (a partial block would read
garbage, and 0 x NaN is NaN; padded keys are masked by position) and, for Triton, the head dims to powers of
two. The kernels see only whole blocks.

Two drivers: the portable row driver (forward.py, backward.py: a loop over key blocks inside each program; CPU
interpret and Triton) and the TPU key-block pipeline (pipeline.py: the loop is a sequential grid axis, VMEM per
grid step independent of T), which every TPU build uses.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas import platform
from kernels_pallas.flash import backward as rows_backward
from kernels_pallas.flash import forward as rows_forward
from kernels_pallas.flash import pipeline
from kernels_pallas.flash.tiles import Plan

# (block_q, block_k, num_warps, num_stages) per target. cpu: interpret mode, where fewer and larger tiles run
# faster; gpu: the FA2-class Triton starting point; tpu: 512-row blocks, which the pipeline keeps at a few MiB
# of VMEM per grid step (pipeline.vmem_estimate). gpu and tpu entries are unmeasured starting points.
BLOCKS = {"cpu": (128, 128, 4, 2), "gpu": (64, 64, 4, 2), "tpu": (512, 512, 4, 2)}
# The smallest block a target accepts: Triton's dots need 16 rows; TPU's blocks need 8 sublanes and 128 lanes.
MIN_BLOCK = {"cpu": (8, 8), "gpu": (16, 16), "tpu": (128, 128)}


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block(preferred: int, length: int, smallest: int) -> int:
    """The preferred tile, shrunk for short inputs to the next power of two >= length (not below smallest)."""
    return min(preferred, max(smallest, _pow2_at_least(length)))


def flash_attention(q, k, v=None, *, causal=True, sliding_window=None, local_window=None, key_log_gate=None,
                    doc_ids=None, scale=None, block_q=None, block_k=None, interpret=None, driver=None):
    """Softmax attention with GQA, K=V (v None), windows, documents and the SP-KV key gate.

    Semantics are `attention.ops.softmax_attention`'s (bottom-right aligned positions; key_log_gate [B,S,Hkv]
    added to a key's logit when t - s >= local_window, or always when local_window is None; a row that sees no
    key gives 0) except that documents come as doc_ids [B,T] (equal id = same document; T == S). Inputs are not
    checked here: the op's API does that. driver: "rows" or "pipeline"; None takes the pipeline exactly when
    building for a TPU (tests run the pipeline interpreted on the CPU by naming it).
    """
    tgt = platform.target()
    if driver not in (None, "rows", "pipeline"):
        raise ValueError(f"driver must be 'rows', 'pipeline' or None; got {driver!r}")
    use_pipeline = tgt == "tpu" if driver is None else driver == "pipeline"
    pref_q, pref_k, warps, stages = BLOCKS[tgt]
    min_q, min_k = MIN_BLOCK[tgt]
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    Dv = D if v is None else v.shape[-1]
    bq = block_q or _block(pref_q, T, min_q)
    bk = block_k or _block(pref_k, S, min_k)
    plan = Plan(t=T, s=S, t_pad=-(-T // bq) * bq, s_pad=-(-S // bk) * bk, block_q=bq, block_k=bk,
                group=Hq // Hkv, scale=float(D) ** -0.5 if scale is None else float(scale), causal=causal,
                sliding_window=sliding_window, local_window=local_window if key_log_gate is not None else None,
                has_gate=key_log_gate is not None, has_segments=doc_ids is not None, kv_shared=v is None,
                interpret=interpret if interpret is not None else platform.resolve_interpret(None),
                num_warps=warps, num_stages=stages, pipeline=use_pipeline)
    # Triton wants power-of-two tiles of at least 16 along a dot's contraction: zero head-dim padding changes no
    # dot product, and extra v columns are cut. (The layout change copies q, k, v anyway.)
    d_pad = max(16, _pow2_at_least(D)) if tgt == "gpu" else D
    dv_pad = max(16, _pow2_at_least(Dv)) if tgt == "gpu" else Dv

    def heads_first(x, length, width):
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, width - x.shape[3])))

    qh = heads_first(q, plan.t_pad, d_pad)
    kh = heads_first(k, plan.s_pad, d_pad)
    vh = None if v is None else heads_first(v, plan.s_pad, dv_pad)
    gate = None
    if key_log_gate is not None:
        # Padded keys are closed (-inf), so a block's closed-gate test sees only its real keys.
        gate = jnp.pad(jnp.swapaxes(key_log_gate.astype(jnp.float32), 1, 2)[:, :, None, :],
                       ((0, 0), (0, 0), (0, 0), (0, plan.s_pad - S)), constant_values=-jnp.inf)
    q_doc = k_doc = None
    if doc_ids is not None:
        # Edge padding keeps each block's document range as tight as its real rows (tiles are skipped by
        # range). Padded query rows then see real keys, harmlessly: their outputs are cut and their
        # cotangent is zero; padded keys are masked by position. The pipeline reads query ids as a lane-dense
        # row [B,1,T], the row driver as a column [B,T,1].
        ids = doc_ids.astype(jnp.int32)
        q_doc = jnp.pad(ids, ((0, 0), (0, plan.t_pad - T)), mode="edge")[:, None, :]
        q_doc = q_doc if plan.pipeline else jnp.swapaxes(q_doc, 1, 2)
        k_doc = jnp.pad(ids, ((0, 0), (0, plan.s_pad - S)), mode="edge")[:, None, :]
    o = _flash(plan, qh, kh, vh, gate, q_doc, k_doc)
    return jnp.swapaxes(o[:, :, :T, :Dv], 1, 2)


# (forward, backward) of each driver, by plan.pipeline.
_DRIVERS = {False: (rows_forward.forward, rows_backward.backward), True: (pipeline.forward, pipeline.backward)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(plan, q, k, v, gate, q_doc, k_doc):
    return _DRIVERS[plan.pipeline][0](plan, q, k, v, gate, q_doc, k_doc)[0]


def _flash_fwd(plan, q, k, v, gate, q_doc, k_doc):
    o, lse = _DRIVERS[plan.pipeline][0](plan, q, k, v, gate, q_doc, k_doc)
    return o, (q, k, v, gate, q_doc, k_doc, o, lse)


def _flash_bwd(plan, res, do):
    q, k, v, gate, q_doc, k_doc, o, lse = res
    dq, dk, dv, dgate = _DRIVERS[plan.pipeline][1](plan, q, k, v, gate, q_doc, k_doc, o, lse, do)
    return dq, dk, dv, dgate, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
