"""Lightning attention: causal linear attention with a constant per-head exponential decay.

    o_t = scale * sum_{s<=t} exp(log_decay * (t-s)) (q_t . k_s) v_s

or, as a recurrence over an fp32 state S [B,H,K,V]:

    S_t = exp(log_decay) S_{t-1} + k_t v_t^T,    o_t = scale * S_t^T q_t

An initial state is S_{-1}; it is decayed once before the first token is added. Same semantics as
flash-linear-attention's chunk_simple_gla with g_gamma = log_decay (and scale=1.0 gives the
TransNormerLLM / MiniMax convention, which has no scale).

`segment_ids [B,T]` marks packed documents: a document starts wherever the id changes, and the
state is zero there, so nothing crosses a boundary. The initial state belongs to the first
document only. Ids need not be unique per document: a run of equal ids is one document.

Implementations:
- `reference`: the recurrence, token by token, in a `lax.scan` (obviously correct, slow).
- `xla`: Lightning Attention-2 blocks. Inside a block the decayed quadratic form is computed with
  a mask; across blocks a `lax.scan` carries the state. Every decay exponent is block-local and
  <= 0, so large |log_decay| underflows to zero instead of overflowing.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from attention.ops import dispatch
from attention.ops.recurrent import (check_common, check_qkv, concrete, doc_starts, initial_state_or_zeros,
                                     resolve_scale)

# Block size of the xla form, by backend. CPU: 64 was the fastest fwd+bwd in every run at B=1,
# H=8, K=V=64, T=2048 on the 2-core machine (best of 25, busy machine: 32 -> 88 ms, 64 -> 73 ms,
# 128 -> 82 ms, 256 -> 157 ms): the intra-block work grows with the block, and XLA:CPU gets little
# more matmul efficiency from larger tiles. GPU/TPU: not measured yet; 64 is fla's chunk and the
# LA2 training kernel's block, 128 fills a TPU MXU tile.
BLOCK_SIZES = {"cpu": 64, "gpu": 64, "tpu": 128}
_DEFAULT_BLOCK = 64

_F32 = jnp.float32


def block_size() -> int:
    """Block size the xla form uses on the current backend."""
    return BLOCK_SIZES.get(dispatch.backend(), _DEFAULT_BLOCK)


def lightning(q, k, v, log_decay, *, scale=None, initial_state=None, output_final_state=False,
              segment_ids=None, impl="auto"):
    """Lightning attention. q,k [B,T,H,K]; v [B,T,H,V]; log_decay [H] (<= 0).

    Returns (o [B,T,H,V] in v's dtype, final state [B,H,K,V] fp32 or None).
    `scale=None` means K**-0.5. impl: reference | xla | pallas | auto (auto = xla until a
    Pallas kernel is registered).
    """
    _validate(q, k, v, log_decay, scale, initial_state, segment_ids)
    fn = dispatch.resolve("lightning", impl, q_shape=tuple(q.shape), v_shape=tuple(v.shape),
                          dtype=jnp.dtype(v.dtype), segment_ids=segment_ids is not None,
                          initial_state=initial_state is not None)
    return fn(q, k, v, log_decay, scale=scale, initial_state=initial_state,
              output_final_state=output_final_state, segment_ids=segment_ids)




def _validate(q, k, v, log_decay, scale, initial_state, segment_ids):
    B, T, H, K, V = shape = check_qkv("lightning", q, k, v)
    if jnp.shape(log_decay) != (H,):
        raise ValueError(f"lightning: log_decay must have shape ({H},) (one per head), got {jnp.shape(log_decay)}")
    if not jnp.issubdtype(jnp.result_type(log_decay), jnp.floating):
        raise ValueError(f"lightning: log_decay must be floating point, got {jnp.result_type(log_decay)}")
    # Values can only be checked outside jit; under tracing the caller owns the sign.
    ld = concrete(log_decay)
    if ld is not None and not np.all(np.isfinite(ld) & (ld <= 0)):
        raise ValueError(f"lightning: log_decay must be finite and <= 0 (a decay in (0, 1]), got {ld.tolist()}")
    check_common("lightning", shape, scale, initial_state, segment_ids)


@dispatch.register("lightning", "reference")
def lightning_reference(q, k, v, log_decay, *, scale=None, initial_state=None, output_final_state=False,
                        segment_ids=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = resolve_scale(scale, K)
    decay_H11 = jnp.exp(jnp.asarray(log_decay, _F32))[:, None, None]

    # Elementwise products rather than dots: exact fp32 on every backend, whatever the default
    # matmul precision is.
    def step(S_BHKV, xs):
        q_BHK, k_BHK, v_BHV, start_B = xs
        S_BHKV = jnp.where(start_B[:, None, None, None], 0.0, decay_H11 * S_BHKV)
        S_BHKV = S_BHKV + k_BHK[..., :, None] * v_BHV[..., None, :]
        o_BHV = scale * jnp.sum(q_BHK[..., :, None] * S_BHKV, axis=-2)
        return S_BHKV, o_BHV

    xs = (q.astype(_F32).swapaxes(0, 1), k.astype(_F32).swapaxes(0, 1), v.astype(_F32).swapaxes(0, 1),
          doc_starts(segment_ids, B, T).swapaxes(0, 1))
    S_BHKV, o_TBHV = lax.scan(step, initial_state_or_zeros(initial_state, B, H, K, V), xs)
    return o_TBHV.swapaxes(0, 1).astype(v.dtype), (S_BHKV if output_final_state else None)


def _masked_exp(exponent, mask):
    """exp(exponent) where mask, else 0; masked exponents never reach exp, so neither inf nor
    inf*0 appears in the forward pass or in the gradients."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, exponent, 0.0)), 0.0)


@dispatch.register("lightning", "xla")
def lightning_xla(q, k, v, log_decay, *, scale=None, initial_state=None, output_final_state=False,
                  segment_ids=None, block=None):
    """Blocked form; `block` overrides the per-backend table (tests use small blocks)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = min(block or block_size(), T)
    N = -(-T // C)
    pad = N * C - T
    scale = resolve_scale(scale, K)
    lam_H = jnp.asarray(log_decay, _F32)

    def blocks(x, s):
        # Right padding: padded keys are masked out of the state below, so the final state is
        # exact (left padding would instead decay the initial state).
        x = jnp.pad(x.astype(_F32), ((0, 0), (0, pad), (0, 0), (0, 0)))
        return (x * s).reshape(B, N, C, H, -1).transpose(0, 3, 1, 2, 4)

    q_BHNCK, k_BHNCK, v_BHNCV = blocks(q, scale), blocks(k, 1.0), blocks(v, 1.0)

    # Document index per token (how many documents started at or before it). Equal index = same
    # document; without segments every token is in document 0 and the masks broadcast over B.
    if segment_ids is None:
        doc_BT = jnp.zeros((1, T), jnp.int32)
    else:
        doc_BT = jnp.cumsum(doc_starts(segment_ids, B, T), axis=1, dtype=jnp.int32)
    doc_BNC = jnp.pad(doc_BT, ((0, 0), (0, pad)), mode="edge").reshape(-1, N, C)
    # The document of the token just before each block (block 0: the initial state's, i.e. 0), and
    # of each block's last real token.
    doc_before_BN = jnp.pad(doc_BNC[:, :-1, -1], ((0, 0), (1, 0)))
    length_N = np.minimum(C, T - C * np.arange(N))
    doc_last_BN = doc_BNC[:, np.arange(N), length_N - 1]

    i_C = np.arange(C)
    lam_H11 = lam_H[:, None, None]

    # Intra-block: decayed causal quadratic form within the same document.
    dist_CC = (i_C[:, None] - i_C[None, :]).astype(np.float32)
    same_doc_BNCC = doc_BNC[:, :, :, None] == doc_BNC[:, :, None, :]
    mask_B1NCC = (same_doc_BNCC & (dist_CC >= 0))[:, None]
    decay_BHNCC = _masked_exp(lam_H[:, None, None, None] * dist_CC, mask_B1NCC)
    scores_BHNCC = jnp.einsum("bhnik,bhnjk->bhnij", q_BHNCK, k_BHNCK) * decay_BHNCC
    o_BHNCV = jnp.einsum("bhnij,bhnjv->bhniv", scores_BHNCC, v_BHNCV)

    # Each block's own contribution to the state leaving it: keys decayed to the block's last real
    # token, restricted to that token's document (padded keys excluded).
    to_end_NC = (length_N[:, None] - 1 - i_C[None, :]).astype(np.float32)
    key_mask_B1NC = ((i_C[None, :] < length_N[:, None]) & (doc_BNC == doc_last_BN[:, :, None]))[:, None]
    kdecay_BHNC = _masked_exp(lam_H11 * to_end_NC, key_mask_B1NC)
    kv_BHNKV = jnp.einsum("bhnjk,bhnjv->bhnkv", k_BHNCK * kdecay_BHNC[..., None], v_BHNCV)
    # The incoming state reaches the block's end only if no document starts in between.
    block_decay_HN = jnp.exp(lam_H[:, None] * length_N.astype(np.float32))
    carry_BHN = jnp.where((doc_last_BN == doc_before_BN)[:, None], block_decay_HN, 0.0)

    def step(S_BHKV, xs):
        kv_BHKV, carry_BH = xs
        return carry_BH[..., None, None] * S_BHKV + kv_BHKV, S_BHKV

    carry_NBH = jnp.broadcast_to(carry_BHN, (B, H, N)).transpose(2, 0, 1)
    S_BHKV, S_in_NBHKV = lax.scan(step, initial_state_or_zeros(initial_state, B, H, K, V),
                                  (kv_BHNKV.transpose(2, 0, 1, 3, 4), carry_NBH))

    # Inter-block: the incoming state, decayed to each query, for queries still in the document
    # of the token before the block.
    qmask_B1NC = (doc_BNC == doc_before_BN[:, :, None])[:, None]
    qdecay_BHNC = jnp.where(qmask_B1NC, jnp.exp(lam_H11 * (i_C + 1).astype(np.float32)), 0.0)
    o_BHNCV = o_BHNCV + jnp.einsum("bhnik,nbhkv->bhniv", q_BHNCK * qdecay_BHNC[..., None], S_in_NBHKV)

    o_BTHV = o_BHNCV.transpose(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]
    return o_BTHV.astype(v.dtype), (S_BHKV if output_final_state else None)
