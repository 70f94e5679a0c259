"""Lightning attention, the contract: causal linear attention with a constant per-head exponential decay.

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

from attention.ops import dispatch
from attention.ops.recurrent import check_common, check_qkv, concrete


def lightning(q, k, v, log_decay, *, scale=None, initial_state=None, output_final_state=False,
              segment_ids=None, impl="auto"):
    """Lightning attention. q,k [B,T,H,K]; v [B,T,H,V]; log_decay [H] (<= 0).

    Returns (o [B,T,H,V] in v's dtype, final state [B,H,K,V] fp32 or None).
    `scale=None` means K**-0.5. impl: reference | xla | pallas | auto (auto = pallas where a
    kernel supports the call, else xla).
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
