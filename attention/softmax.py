"""The `softmax` mixer: multi-head attention with MHA/GQA/MQA (`n_kv_heads`) over `ops.softmax_attention`."""
from __future__ import annotations

from typing import Literal, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from attention import ops
from attention.base import MixerConfig, MixerContext
from attention.ops.softmax import decode_attention
from lm.layers import Linear, RMSNorm, apply_rope


class SoftmaxConfig(MixerConfig):
    kind: Literal["softmax"] = "softmax"
    n_heads: int = 8
    n_kv_heads: Optional[int] = None  # None: n_heads (MHA); 1: MQA; otherwise GQA
    head_dim: Optional[int] = None  # None: d_model // n_heads
    pos: Optional[Literal["rope", "none"]] = None  # None: rope when the model uses rope, else none (NoPE layers)
    qk_norm: bool = False
    sliding_window: Optional[int] = None
    scale: Optional[float] = None  # None: head_dim ** -0.5

    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def check(self, ctx: MixerContext) -> list[str]:
        errs = []
        if self.n_heads < 1:
            errs.append(f"n_heads: must be >= 1, got {self.n_heads}")
            return errs
        if self.n_heads % self.kv_heads():
            errs.append(f"n_kv_heads: n_heads {self.n_heads} is not divisible by n_kv_heads {self.kv_heads()}")
        if self.head_dim is None and ctx.d_model % self.n_heads:
            errs.append(f"n_heads: d_model {ctx.d_model} is not divisible by n_heads {self.n_heads} (or set head_dim)")
        if self.rope(ctx) and self.dim(ctx.d_model) % 2:
            errs.append(f"head_dim: RoPE needs an even head_dim, got {self.dim(ctx.d_model)}")
        if self.sliding_window is not None and not (1 <= self.sliding_window <= ctx.seq_len):
            errs.append(f"sliding_window: must be in [1, data.seq_len={ctx.seq_len}], got {self.sliding_window}")
        if self.pos == "rope" and ctx.pos == "learned":
            errs.append("pos: rope inside a mixer of a model with learned positions is not supported")
        return errs

    def rope(self, ctx: MixerContext) -> bool:
        return (self.pos or ("rope" if ctx.pos == "rope" else "none")) == "rope"


class SoftmaxAttention(nnx.Module):
    def __init__(self, cfg: SoftmaxConfig, ctx: MixerContext, *, rngs: nnx.Rngs):
        self.cfg, self.ctx = cfg, ctx
        d, H, Hkv, hd = ctx.d_model, cfg.n_heads, cfg.kv_heads(), cfg.dim(ctx.d_model)
        self.H, self.Hkv, self.hd = H, Hkv, hd
        lin = dict(bias=ctx.bias, std=ctx.init_std, dtype=ctx.dtype, rngs=rngs)
        self.q_proj = Linear(d, H * hd, axes=("embed", "heads"), **lin)
        self.k_proj = Linear(d, Hkv * hd, axes=("embed", "kv_heads"), **lin)
        self.v_proj = Linear(d, Hkv * hd, axes=("embed", "kv_heads"), **lin)
        self.o_proj = Linear(H * hd, d, axes=("heads", "embed"), **{**lin, "std": ctx.out_std})
        self.q_norm = RMSNorm(hd, eps=ctx.norm_eps, axes=(None,)) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, eps=ctx.norm_eps, axes=(None,)) if cfg.qk_norm else None
        self.use_rope = cfg.rope(ctx)

    def _project(self, x_BTD: jax.Array, positions_BT: jax.Array):
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD).reshape(B, T, self.H, self.hd)
        k = self.k_proj(x_BTD).reshape(B, T, self.Hkv, self.hd)
        v = self.v_proj(x_BTD).reshape(B, T, self.Hkv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            q = apply_rope(q, positions_BT, self.ctx.rope_theta)
            k = apply_rope(k, positions_BT, self.ctx.rope_theta)
        return q, k, v

    def __call__(self, x_BTD: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        B, T, _ = x_BTD.shape
        q, k, v = self._project(x_BTD, positions)
        o = ops.softmax_attention(q, k, v, causal=True, sliding_window=self.cfg.sliding_window,
                                  segment_ids=segment_ids, scale=self.cfg.scale, impl=self.ctx.impl)
        return self.o_proj(o.reshape(B, T, self.H * self.hd))

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        shape = (batch, max_len, self.Hkv, self.hd)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def decode(self, x_B1D: jax.Array, cache: dict, position: jax.Array) -> tuple[jax.Array, dict]:
        B = x_B1D.shape[0]
        pos_B1 = jnp.full((B, 1), position, jnp.int32)
        q, k, v = self._project(x_B1D, pos_B1)
        kc = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), position, axis=1)
        vc = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), position, axis=1)
        S = kc.shape[1]
        s = jnp.arange(S)
        valid_S = s <= position
        if self.cfg.sliding_window is not None:
            valid_S &= s > position - self.cfg.sliding_window
        valid = jnp.broadcast_to(valid_S[None, :, None], (B, S, self.Hkv))
        o = decode_attention(q, kc, vc, valid, scale=self.cfg.scale)
        return self.o_proj(o.reshape(B, 1, self.H * self.hd)), {"k": kc, "v": vc}

    def cache_bytes_per_token(self, dtype_bytes: int | None = None) -> int:
        nbytes = dtype_bytes or jnp.dtype(self.ctx.dtype).itemsize
        return 2 * self.Hkv * self.hd * nbytes

    def flops_per_token(self, seq_len: int) -> float:
        d, H, Hkv, hd = self.ctx.d_model, self.H, self.Hkv, self.hd
        proj = 2 * d * (H * hd + 2 * Hkv * hd) + 2 * H * hd * d
        return proj + 4 * H * hd * visible_keys_per_query(seq_len, self.cfg.sliding_window)


def visible_keys_per_query(seq_len: int, window: int | None) -> float:
    """Mean number of keys a causal query attends to (exact, so causal counts about half of T)."""
    T = seq_len
    if window is None or window >= T:
        return (T + 1) / 2
    full = window * (window + 1) / 2 + (T - window) * window
    return full / T
