"""Lightning Attention-2 blocks in jnp: the decayed quadratic form inside a block (masked), a `lax.scan`
across blocks for the fp32 state. Every decay exponent is block-local and <= 0."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from attention.ops import dispatch
from attention.ops.recurrent import doc_starts, initial_state_or_zeros, masked_exp, resolve_scale

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
    decay_BHNCC = masked_exp(lam_H[:, None, None, None] * dist_CC, mask_B1NCC)
    scores_BHNCC = jnp.einsum("bhnik,bhnjk->bhnij", q_BHNCK, k_BHNCK) * decay_BHNCC
    o_BHNCV = jnp.einsum("bhnij,bhnjv->bhniv", scores_BHNCC, v_BHNCV)

    # Each block's own contribution to the state leaving it: keys decayed to the block's last real
    # token, restricted to that token's document (padded keys excluded).
    to_end_NC = (length_N[:, None] - 1 - i_C[None, :]).astype(np.float32)
    key_mask_B1NC = ((i_C[None, :] < length_N[:, None]) & (doc_BNC == doc_last_BN[:, :, None]))[:, None]
    kdecay_BHNC = masked_exp(lam_H11 * to_end_NC, key_mask_B1NC)
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
