"""Softmax attention, the contract: `softmax_attention` (training and prefill) and `softmax_decode` (new query
tokens against a KV cache), their argument checks and dispatch. `reference.py` holds the dense oracles,
`xla.py` the blocked online softmax and the cache read in the cache's own dtype.

Conventions shared by every implementation:

- Layout is time-major: q [B,T,Hq,D], k [B,S,Hkv,D], v [B,S,Hkv,Dv]; Hq % Hkv == 0 and query head h
  reads kv head h // (Hq // Hkv).
- Positions are bottom-right aligned: query i sits at position S - T + i, key s at position s. This is
  what makes causal prefill against a longer cache (T < S) line up with the newest keys.
- Masks: causal keeps s <= t; sliding_window=W keeps 0 <= t - s < W; segment_ids keeps pairs in the
  same document, where a document starts wherever the id changes (as in the kda and lightning ops,
  so a reused id is still a new document).
  A key_log_gate value is added to the logit of key s for query t when t - s >= local_window (every
  key when local_window is None), the SP-KV soft write gate.
- A query row that sees no key returns 0, with zero gradients, never NaN.
"""
from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax

from attention.ops import dispatch


def softmax_attention(q, k, v, *, causal=True, sliding_window=None, local_window=None,
                      key_log_gate=None, segment_ids=None, scale=None, impl="auto"):
    """Multi-head softmax attention with GQA, windows, packed segments and the SP-KV key gate.

    q [B,T,Hq,D]; k [B,S,Hkv,D]; v [B,S,Hkv,Dv] (v may be k itself) -> o [B,T,Hq,Dv] in q's dtype.
    key_log_gate [B,S,Hkv] (<= 0, may be -inf); segment_ids [B,T] int (needs T == S);
    scale=None means D**-0.5. Accumulation is fp32 whatever the input dtype.
    """
    _validate(q, k, v, causal=causal, sliding_window=sliding_window, local_window=local_window,
              key_log_gate=key_log_gate, segment_ids=segment_ids, scale=scale)
    fn = dispatch.resolve("softmax_attention", impl, **call_info(
        q, k, v, causal=causal, sliding_window=sliding_window, local_window=local_window,
        key_log_gate=key_log_gate, segment_ids=segment_ids))
    return fn(q, k, v, causal=causal, sliding_window=sliding_window, local_window=local_window,
              key_log_gate=key_log_gate, segment_ids=segment_ids, scale=scale)


def call_info(q, k, v, *, causal, sliding_window, local_window, key_log_gate, segment_ids) -> dict:
    """What dispatch knows of a call: what each implementation's `supports` and auto's choice read."""
    return dict(dtype=jnp.dtype(q.dtype), q_shape=q.shape, k_shape=k.shape, v_shape=v.shape, causal=causal,
                sliding_window=sliding_window, local_window=local_window, has_key_log_gate=key_log_gate is not None,
                has_segment_ids=segment_ids is not None, kv_shared=v is k)


def _validate(q, k, v, *, causal, sliding_window, local_window, key_log_gate, segment_ids, scale):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [batch, time, heads, dim]; got shape {tuple(x.shape)}")
    B, T, Hq, D = q.shape
    Bk, S, Hkv, Dk = k.shape
    if T == 0 or S == 0:
        raise ValueError(f"q and k need at least one time step; got T={T}, S={S}")
    if Bk != B:
        raise ValueError(f"k batch {Bk} != q batch {B} (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if Dk != D:
        raise ValueError(f"k head dim {Dk} != q head dim {D} (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v shape {tuple(v.shape)} must match k {tuple(k.shape)} in batch, time and heads")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool; got {causal!r}")
    if sliding_window is not None:
        if not _is_int(sliding_window) or sliding_window < 1:
            raise ValueError("sliding_window must be a positive int (keys with 0 <= t - s < W); "
                             f"got {sliding_window!r}")
        if not causal:
            raise ValueError("sliding_window requires causal=True: the window is 0 <= t - s < W")
    if local_window is not None:
        if not _is_int(local_window) or local_window < 0:
            raise ValueError(f"local_window must be an int >= 0; got {local_window!r}")
        if key_log_gate is None:
            raise ValueError("local_window only says which keys key_log_gate spares; pass key_log_gate too")
    if key_log_gate is not None and tuple(key_log_gate.shape) != (B, S, Hkv):
        raise ValueError(f"key_log_gate must be [batch, kv_time, kv_heads] = {(B, S, Hkv)}; "
                         f"got {tuple(key_log_gate.shape)}")
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (B, T):
            raise ValueError(f"segment_ids must be [batch, time] = {(B, T)}; got {tuple(segment_ids.shape)}")
        if T != S:
            raise ValueError(f"segment_ids needs q and k of the same length; got T={T}, S={S}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be integers; got dtype {segment_ids.dtype}")
    if scale is not None and (not isinstance(scale, numbers.Real) or isinstance(scale, bool)):
        raise ValueError(f"scale must be a Python number or None; got {type(scale).__name__}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def documents(segment_ids_BT):
    """Document index of each token: 0, 1, 2, ... counting the places where the id changes."""
    starts = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
    return jnp.cumsum(jnp.pad(starts, ((0, 0), (1, 0))), axis=1, dtype=jnp.int32)


def resolve_scale(scale, head_dim: int) -> float:
    return float(head_dim) ** -0.5 if scale is None else float(scale)


def matmul_precision(dtype):
    # fp32 inputs mean fp32 products: keep GPU/TPU from silently dropping to tf32/bf16 passes.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


class KeyPages(NamedTuple):
    """A paged store of keys and values that `softmax_decode` reads beside the dense cache: a pool of P pages of
    `page` slots shared by the batch's (sequence, kv head) pairs, each pair owning a list of pages. Pair (b, h)
    holds slots [0, lengths[b, h]) of its list: slot i is row i % page of page table[b, h, i // page]. Table
    entries past a pair's held pages and rows past its length may hold anything.

    k [P, page, D] and v [P, page, Dv] (v may be k itself: K=V), in the dense cache's dtype; table [B, Hkv, n]
    int; lengths [B, Hkv] int; positions [P, page] int, each slot's token position (needed to rotate derived
    keys, key_rope_theta); key_log_gate [P, page] (<= 0) added to each slot's logit (None: nothing)."""

    k: Any
    v: Any
    table: Any
    lengths: Any
    positions: Any = None
    key_log_gate: Any = None


def softmax_decode(q, k, v, valid=None, *, lengths=None, key_log_gate=None, scale=None, key_norm_scale=None,
                   key_norm_eps=1e-5, key_rope_theta=None, key_positions=None, pages=None, impl="auto"):
    """One query token against a KV cache: q [B,1,Hq,D], k [B,S,Hkv,D], v [B,S,Hkv,Dv] -> [B,1,Hq,Dv].

    lengths [B,Hkv] int: kv head h of sequence b holds slots [0, lengths[b,h]) and only those are read (the
    fast implementations stop there: a pruned cache or a cache filled to the current position costs what it
    holds, not what it allocated); slots past it may hold anything. None: all S slots. valid [B,S,Hkv] bool
    (None: every slot) further marks the slots each kv head may read (a cache with holes). key_log_gate
    [B,S,Hkv] (<= 0) is added to the logit of every cached key; the caller exempts keys inside any local
    window. Softmax statistics in fp32; a head with no readable key returns 0.

    The scores' keys may be derived from the cached k (a K=V cache holds the raw shared projection, which is
    the value): RMS-normalised with scale key_norm_scale [D] (eps key_norm_eps), then rotated by RoPE
    (key_rope_theta, half-split pairs) at key_positions [B,S,Hkv] int, in fp32 (`transform_keys`). Values are
    the cached v as stored, so passing k itself as v reads one array for both.

    pages (`KeyPages`, optional): a paged store each (sequence, kv head) also reads, up to its own length, in the
    same softmax (a pruned cache's store: pages of a pool shared by the batch); the key transform applies to it
    too, at pages.positions.
    """
    if q.ndim != 4 or q.shape[1] != 1:
        raise ValueError(f"q must be [batch, 1, heads, dim]; got shape {tuple(q.shape)}")
    _validate(q, k, v, causal=False, sliding_window=None, local_window=None, key_log_gate=None,
              segment_ids=None, scale=scale)
    B, _, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    for name, x, shape in (("valid", valid, (B, S, Hkv)), ("key_log_gate", key_log_gate, (B, S, Hkv)),
                           ("lengths", lengths, (B, Hkv))):
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"{name} must be {shape} ([batch, kv_time, kv_heads] or, for lengths, [batch, "
                             f"kv_heads]); got {tuple(x.shape)}")
    if lengths is not None and not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be integers; got dtype {lengths.dtype}")
    if key_norm_scale is not None and tuple(key_norm_scale.shape) != (D,):
        raise ValueError(f"key_norm_scale must be [head_dim] = ({D},); got {tuple(key_norm_scale.shape)}")
    if key_rope_theta is not None:
        if key_positions is None or tuple(key_positions.shape) != (B, S, Hkv):
            got = None if key_positions is None else tuple(key_positions.shape)
            raise ValueError(f"key_rope_theta needs key_positions [batch, kv_time, kv_heads] = {(B, S, Hkv)}; "
                             f"got {got}")
        if D % 2:
            raise ValueError(f"RoPE pairs channels i and i + D/2: head dim {D} must be even")
    if pages is not None:
        _validate_pages(pages, k, v, key_rope_theta)
        if pages.k.shape[0] == 0 or pages.table.shape[-1] == 0:
            pages = None  # an empty pool holds nothing
    fn = dispatch.resolve("softmax_decode", impl, dtype=jnp.dtype(q.dtype), q_shape=q.shape, k_shape=k.shape,
                          v_shape=v.shape, has_key_log_gate=key_log_gate is not None,
                          page_size=None if pages is None else pages.k.shape[1])
    return fn(q, k, v, valid, lengths=lengths, key_log_gate=key_log_gate, scale=scale, key_norm_scale=key_norm_scale,
              key_norm_eps=key_norm_eps, key_rope_theta=key_rope_theta, key_positions=key_positions, pages=pages)


def _validate_pages(pages, k, v, key_rope_theta) -> None:
    if not isinstance(pages, KeyPages):
        raise ValueError(f"pages must be a KeyPages; got {type(pages).__name__}")
    B, _, Hkv, D = k.shape
    Dv = v.shape[-1]
    if pages.k.ndim != 3 or pages.k.shape[-1] != D:
        raise ValueError(f"pages.k must be [pages, page, head_dim] with head_dim {D}; got {tuple(pages.k.shape)}")
    P, page = pages.k.shape[:2]
    if tuple(pages.v.shape) != (P, page, Dv):
        raise ValueError(f"pages.v must be [pages, page, value_dim] = {(P, page, Dv)}; got {tuple(pages.v.shape)}")
    if pages.k.dtype != k.dtype or pages.v.dtype != v.dtype:
        raise ValueError(f"pages must hold the dense cache's dtypes ({k.dtype}, {v.dtype}); got "
                         f"({pages.k.dtype}, {pages.v.dtype})")
    if pages.table.ndim != 3 or tuple(pages.table.shape[:2]) != (B, Hkv):
        raise ValueError(f"pages.table must be [batch, kv_heads, pages per pair] with batch, kv_heads = {(B, Hkv)}; "
                         f"got {tuple(pages.table.shape)}")
    if tuple(pages.lengths.shape) != (B, Hkv):
        raise ValueError(f"pages.lengths must be [batch, kv_heads] = {(B, Hkv)}; got {tuple(pages.lengths.shape)}")
    for name, x in (("table", pages.table), ("lengths", pages.lengths)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"pages.{name} must be integers; got dtype {x.dtype}")
    for name, x in (("positions", pages.positions), ("key_log_gate", pages.key_log_gate)):
        if x is not None and tuple(x.shape) != (P, page):
            raise ValueError(f"pages.{name} must be [pages, page] = {(P, page)}; got {tuple(x.shape)}")
    if key_rope_theta is not None and pages.positions is None:
        raise ValueError("key_rope_theta rotates the keys at their positions: pages.positions [pages, page] is needed")


def paged_dense(pages):
    """The pages as a dense cache: (k [B,n*page,Hkv,D], v, readable [B,n*page,Hkv], positions or None, gate or
    None), pair (b, h)'s slot i at row i. For the oracle and for the passes that need every held key at once."""
    P, page = pages.k.shape[:2]
    table = jnp.clip(pages.table, 0, P - 1)
    B, Hkv, n = table.shape

    def dense(x):  # [P, page, ...] -> [B, n * page, Hkv, ...]
        x = jnp.moveaxis(x[table], 1, 3)  # [B, n, page, Hkv, ...]
        return x.reshape(B, n * page, Hkv, *x.shape[4:])

    ok = jnp.arange(n * page)[None, :, None] < jnp.clip(pages.lengths, 0, n * page)[:, None, :]
    k = dense(pages.k)
    return (k, k if pages.v is pages.k else dense(pages.v), ok,
            *(None if x is None else dense(x) for x in (pages.positions, pages.key_log_gate)))


def readable(valid, lengths, shape):
    """[B,S,Hkv] bool: the slots a head reads under `valid` and `lengths` (either may be None)."""
    B, S, Hkv = shape
    ok = jnp.ones(shape, bool) if valid is None else valid
    if lengths is not None:
        ok = ok & (jnp.arange(S)[None, :, None] < lengths[:, None, :])
    return ok


def transform_keys(k, *, key_norm_scale=None, key_norm_eps=1e-5, key_rope_theta=None, key_positions=None):
    """The scores' keys [B,S,Hkv,D] fp32 from cached k: rms_norm(k) * key_norm_scale, then RoPE at
    key_positions (half-split pairs: channel i with i + D/2), each step only when asked for."""
    x = k.astype(jnp.float32)
    if key_norm_scale is not None:
        x = x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + key_norm_eps) * key_norm_scale
    if key_rope_theta is not None:
        D = x.shape[-1]
        inv_freq = 1.0 / (key_rope_theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
        angle = key_positions.astype(jnp.float32)[..., None] * inv_freq
        cos, sin = jnp.cos(angle), jnp.sin(angle)
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        x = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return x
