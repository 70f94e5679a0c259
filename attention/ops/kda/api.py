"""Kimi Delta Attention (KDA), the contract: delta-rule linear attention with per-channel forget gates.

Per (batch, head) an fp32 state S [K, V] evolves token by token:

    S <- diag(exp g_t) S                       decay first, one factor per key channel,
    S <- S + beta_t k_t (v_t - S^T k_t)^T      then the delta write, its error read from the decayed state,
    o_t = S^T (scale q_t)                      and the read sees the token just written.

Same semantics as flash-linear-attention's naive_recurrent_kda. q and k are expected L2-normalised
by the caller; the op does not normalise them. `scale=None` means K**-0.5.

`segment_ids [B,T]` marks packed documents: a document starts wherever the id changes, and the state
is zero just before it, so nothing crosses a boundary. `initial_state` is the state before t=0 and
so belongs to the first document of each row only. A run of equal ids is one document.

Implementations:
- `reference`: the recurrence above, token by token, in a `lax.scan`.
- `xla`: chunks of 64 tokens in the WY/UT form. Inside a chunk the pseudo-values
  delta = (I + L)^-1 (beta v - beta (k exp G) S_in) come from one unit-lower-triangular inverse; a
  `lax.scan` over chunks carries the state. Every decay exponent is a sum of gates over a causal
  range, so it is <= 0 and large |g| underflows to zero instead of overflowing.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from attention.ops import dispatch
from attention.ops.recurrent import check_common, check_qkv, concrete


def kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
        segment_ids=None, impl="auto"):
    """Kimi Delta Attention.

    q, k [B,T,H,K]; v [B,T,H,V]; g [B,T,H,K] log decay (<= 0); beta [B,T,H];
    initial_state [B,H,K,V] fp32; segment_ids [B,T] integers.
    Returns (o [B,T,H,V] in v's dtype, final state [B,H,K,V] fp32 or None).
    impl: reference | xla | pallas | auto (auto = pallas where a kernel supports the call, else xla).
    """
    _validate(q, k, v, g, beta, scale, initial_state, segment_ids)
    fn = dispatch.resolve("kda", impl, q_shape=tuple(q.shape), v_shape=tuple(v.shape),
                          dtype=jnp.dtype(v.dtype), segment_ids=segment_ids is not None,
                          initial_state=initial_state is not None)
    return fn(q, k, v, g, beta, scale=scale, initial_state=initial_state,
              output_final_state=output_final_state, segment_ids=segment_ids)


def _validate(q, k, v, g, beta, scale, initial_state, segment_ids):
    if jnp.ndim(g) != 4:
        raise ValueError(f"kda: g must be [batch, time, heads, dim], got shape {jnp.shape(g)}")
    B, T, H, K, V = shape = check_qkv("kda", q, k, v, g=g, beta=beta)
    if g.shape != q.shape:
        raise ValueError(f"kda: g shape {g.shape} must equal q shape {q.shape} (one log decay per key channel)")
    if jnp.shape(beta) != (B, T, H):
        raise ValueError(f"kda: beta must have shape {(B, T, H)} (one per token and head), got {jnp.shape(beta)}")
    # Values can only be checked outside jit; under tracing the caller owns the sign.
    g_np = concrete(g)
    if g_np is not None:
        g_np = g_np.astype(np.float32)
        if not np.all(g_np <= 0):
            raise ValueError("kda: g must be a log decay <= 0 and not NaN; "
                             f"found max {np.nanmax(g_np):.3g}, NaN present: {bool(np.isnan(g_np).any())}")
    check_common("kda", shape, scale, initial_state, segment_ids)
