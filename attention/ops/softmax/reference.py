"""Dense fp32 softmax attention: the oracle of every other implementation (O(T*S) memory)."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from attention.ops import dispatch
from attention.ops.softmax.api import documents, paged_dense, readable, resolve_scale, transform_keys


@dispatch.register("softmax_attention", "reference")
def softmax_attention_reference(q, k, v, *, causal=True, sliding_window=None, local_window=None,
                                key_log_gate=None, segment_ids=None, scale=None):
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    f32 = jnp.float32
    k_BSHD = jnp.repeat(k.astype(f32), group, axis=2)
    v_BSHD = jnp.repeat(v.astype(f32), group, axis=2)
    logits_BHTS = jnp.einsum("bthd,bshd->bhts", q.astype(f32), k_BSHD,
                             precision=lax.Precision.HIGHEST) * resolve_scale(scale, D)

    t_T = jnp.arange(T)[:, None] + (S - T)
    s_S = jnp.arange(S)[None, :]
    visible_BTS = jnp.ones((1, T, S), bool)
    if causal:
        visible_BTS &= s_S <= t_T
    if sliding_window is not None:
        visible_BTS &= (t_T - s_S >= 0) & (t_T - s_S < sliding_window)
    if segment_ids is not None:
        doc_BT = documents(segment_ids)
        visible_BTS &= doc_BT[:, :, None] == doc_BT[:, None, :]
    if key_log_gate is not None:
        gate_BHS = jnp.repeat(key_log_gate.astype(f32), group, axis=2).transpose(0, 2, 1)
        gated_TS = jnp.ones((T, S), bool) if local_window is None else t_T - s_S >= local_window
        logits_BHTS += jnp.where(gated_TS, gate_BHS[:, :, None, :], 0.0)

    visible_BHTS = visible_BTS[:, None]
    masked = jnp.where(visible_BHTS, logits_BHTS, -jnp.inf)
    row_max = jnp.max(masked, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    # The mask goes in before exp, so masked entries are exp(-inf) = 0 with a zero derivative.
    e_BHTS = jnp.exp(jnp.where(visible_BHTS, logits_BHTS - row_max, -jnp.inf))
    denom = jnp.sum(e_BHTS, axis=-1, keepdims=True)
    p_BHTS = e_BHTS / jnp.where(denom > 0, denom, 1.0)
    o_BTHD = jnp.einsum("bhts,bshd->bthd", p_BHTS, v_BSHD, precision=lax.Precision.HIGHEST)
    return o_BTHD.astype(q.dtype)


@dispatch.register("softmax_decode", "reference")
def softmax_decode_reference(q, k, v, valid=None, *, lengths=None, key_log_gate=None, scale=None, pages=None,
                             **key_transform):
    """The dense oracle above, non-causal, with every key a head may not read gated to -inf, on the keys
    `transform_keys` derives (fp32). Slots a head may not read are zeroed first: they may hold anything. A paged
    store is laid out densely after the cache's slots (`paged_dense`)."""
    ok = readable(valid, lengths, k.shape[:3])
    gate = jnp.zeros(ok.shape, jnp.float32) if key_log_gate is None else key_log_gate.astype(jnp.float32)
    if pages is not None:
        pk, pv, p_ok, p_pos, p_gate = paged_dense(pages)
        k, v, ok = (jnp.concatenate(pair, axis=1) for pair in ((k, pk), (v, pv), (ok, p_ok)))
        p_gate = jnp.zeros(p_ok.shape, jnp.float32) if p_gate is None else p_gate.astype(jnp.float32)
        gate = jnp.concatenate([gate, p_gate], axis=1)
        if key_transform.get("key_rope_theta") is not None:
            key_transform = {**key_transform,
                             "key_positions": jnp.concatenate([key_transform["key_positions"], p_pos], axis=1)}
    keys = transform_keys(jnp.where(ok[..., None], k, 0), **key_transform)
    return softmax_attention_reference(q, keys, jnp.where(ok[..., None], v, 0), causal=False,
                                       key_log_gate=jnp.where(ok, gate, -jnp.inf), scale=scale)
