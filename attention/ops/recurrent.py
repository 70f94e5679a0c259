"""Argument checks and helpers shared by the linear-recurrence ops (kda, lightning).

Both take q, k [B,T,H,K], v [B,T,H,V], a float32 state [B,H,K,V] and packed-document segment ids
[B,T]; a document starts wherever the id changes, and the initial state applies at t=0 only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


def concrete(x) -> np.ndarray | None:
    """x as a numpy array, or None when it is traced (then value checks cannot run)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_qkv(op: str, q, k, v, **more) -> tuple[int, int, int, int, int]:
    """Ranks, dtypes and shapes of q, k, v (and `more` arrays that must be floating); returns B, T, H, K, V."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"{op}: {name} must be [batch, time, heads, dim], got shape {jnp.shape(x)}")
    for name, x in (("q", q), ("k", k), ("v", v), *more.items()):
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(f"{op}: {name} must be floating point, got {jnp.result_type(x)}")
    if k.shape != q.shape:
        raise ValueError(f"{op}: k shape {k.shape} must equal q shape {q.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: v shape {v.shape} must match q {q.shape} in batch, time and heads")
    B, T, H, K = q.shape
    if T == 0:
        raise ValueError(f"{op}: the time dimension is empty")
    return B, T, H, K, v.shape[-1]


def check_common(op: str, shape: tuple[int, int, int, int, int], scale, initial_state, segment_ids) -> None:
    """scale, initial_state and segment_ids of a recurrence op with dims (B, T, H, K, V)."""
    B, T, H, K, V = shape
    if scale is not None:
        if jnp.ndim(scale) != 0:
            raise ValueError(f"{op}: scale must be a scalar, got shape {jnp.shape(scale)}")
        s = concrete(scale)
        if s is not None and not np.isfinite(s):
            raise ValueError(f"{op}: scale must be finite, got {s}")
    if initial_state is not None:
        if jnp.shape(initial_state) != (B, H, K, V):
            raise ValueError(f"{op}: initial_state must have shape {(B, H, K, V)}, got {jnp.shape(initial_state)}")
        if initial_state.dtype != F32:
            raise ValueError(f"{op}: initial_state must be float32 (the state is kept in fp32), "
                             f"got {initial_state.dtype}")
    if segment_ids is not None:
        if jnp.shape(segment_ids) != (B, T):
            raise ValueError(f"{op}: segment_ids must have shape {(B, T)}, got {jnp.shape(segment_ids)}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"{op}: segment_ids must be integers, got {segment_ids.dtype}")


def resolve_scale(scale, K: int):
    return K ** -0.5 if scale is None else scale


def initial_state_or_zeros(initial_state, B: int, H: int, K: int, V: int) -> jax.Array:
    return jnp.zeros((B, H, K, V), F32) if initial_state is None else initial_state.astype(F32)


def doc_starts(segment_ids, B: int, T: int) -> jax.Array:
    """[B,T] bool: a new document starts at t (never at t=0, where the initial state applies)."""
    if segment_ids is None:
        return jnp.zeros((B, T), bool)
    return jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))


def doc_index(segment_ids, B: int, T: int) -> jax.Array | None:
    """[B,T] int32 document index of each token (0 for the first, +1 at each start), or None without ids."""
    if segment_ids is None:
        return None
    return jnp.cumsum(doc_starts(segment_ids, B, T), axis=1, dtype=jnp.int32)


def masked_exp(exponent, mask):
    """exp(exponent) where mask, else 0; masked exponents never reach exp, so neither inf nor
    inf*0 appears in the forward pass or in the gradients."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, exponent, 0.0)), 0.0)


def chunk_kernel_supports(kernel: str):
    """The `supports` check of a chunk-pipeline kernel (kda, lightning): float inputs and, compiled for a GPU or
    TPU, K and V powers of two from 16 to 256, the shapes whose structure `attnlab kernels lower --report` checks
    (a program per chunk, bf16 matmuls, VMEM per grid step independent of T; Triton needs powers of two and
    16-row dots anyway). Interpreted on the CPU any shape runs."""
    from attention.ops import dispatch

    dtypes = dispatch.float_inputs(kernel)

    def supports(*, backend, dtype, q_shape, v_shape, **_):
        why_not = dtypes(dtype=dtype)
        if why_not is not None or backend == "cpu":
            return why_not
        K, V = q_shape[-1], v_shape[-1]
        if not all(16 <= d <= 256 and d & (d - 1) == 0 for d in (K, V)):
            return (f"the {kernel} kernels take key and value dims that are powers of two from 16 to 256 "
                    f"(got K={K}, V={V})")
        return None

    return supports
