"""The KDA recurrence token by token in a `lax.scan`: the oracle of every other implementation."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from attention.ops import dispatch
from attention.ops.recurrent import doc_starts, initial_state_or_zeros, resolve_scale

_F32 = jnp.float32


@dispatch.register("kda", "reference")
def kda_reference(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                  segment_ids=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = resolve_scale(scale, K)

    # Elementwise products and sums rather than dots: exact fp32 on every backend, whatever the
    # default matmul precision is.
    def step(S_BHKV, xs):
        q_BHK, k_BHK, v_BHV, g_BHK, beta_BH, start_B = xs
        S_BHKV = jnp.where(start_B[:, None, None, None], 0.0, S_BHKV)
        S_BHKV = jnp.exp(g_BHK)[..., None] * S_BHKV
        err_BHV = v_BHV - jnp.sum(k_BHK[..., None] * S_BHKV, axis=-2)
        S_BHKV = S_BHKV + (beta_BH[..., None] * k_BHK)[..., None] * err_BHV[..., None, :]
        o_BHV = jnp.sum((scale * q_BHK)[..., None] * S_BHKV, axis=-2)
        return S_BHKV, o_BHV

    xs = tuple(x.astype(_F32).swapaxes(0, 1) for x in (q, k, v, g, beta)) + (
        doc_starts(segment_ids, B, T).swapaxes(0, 1),)
    S_BHKV, o_TBHV = lax.scan(step, initial_state_or_zeros(initial_state, B, H, K, V), xs)
    return o_TBHV.swapaxes(0, 1).astype(v.dtype), (S_BHKV if output_final_state else None)
