"""The lightning recurrence token by token in a `lax.scan`: the oracle of every other implementation."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from attention.ops import dispatch
from attention.ops.recurrent import doc_starts, initial_state_or_zeros, resolve_scale

_F32 = jnp.float32


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
