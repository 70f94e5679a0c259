"""The `cca` mixer: Compressed Convolutional Attention and its grouped form CCGQA (Zyphra, arXiv 2510.04476).

Attention runs entirely in a compressed latent space. Per token x (width E = d_model):

    q0 = x Wq  (n_q heads x d)            k0 = x Wk, v = x Wv  (n_kv heads x d)
    q, k   = conv2(conv1([q0 | k0]))                 causal convs over time, q and k heads kept apart
    q     += (q0 + k0[h // g]) / 2                   qk-mean from the PRE-conv latents, g = n_q / n_kv
    k     += (mean_{h in group} q0 + k0) / 2
    q^ = sqrt(d) q / |q|,  k^ = sqrt(d) exp(t) k / |k|   one learned temperature t per kv head
    RoPE on the first rope_fraction * d channels of q^, k^ (half-split pairing)
    o = softmax(q^ k^T / sqrt(d)) v  (causal GQA),  y = o Wo  (Wo is (n_q d) x E)

conv1 is depthwise (one k0-tap filter per channel); conv2 mixes the d channels of each head with a d x d
matrix per tap (k1 taps). Both run after ONE left pad of P = (k0-1) + (k1-1) zero rows, so conv1's bias
in the padded rows reaches conv2 (the reference PyTorch layers' semantics; decode keeps the last P raw
latent rows and reproduces it exactly). With value_shift, the second half of the value channels (kv heads
n_kv/2.. when n_kv is even; the second half of the single head for n_kv = 1) comes from the previous
token's projection, with its own weights. Document starts (segment_ids) act like the sequence start for
the convs and the shift.

CCA is n_q = n_kv; CCGQA has n_q = g n_kv. Compression comes from fewer heads at a normal head dim:
query width n_q d = E / C1, cache width n_kv d = E / C2. The defaults (4 heads of 64) are the digest's
small-scale CCA 4/4 at d = 64, i.e. 4x compression at d_model = 1024 (and none at d_model = 256).

Parameter count (`n_params`) follows the paper's Table II, 2 E^2 / C1 + 2 E^2 / C2 + conv, with the conv
counted from the layer's real shapes, per side (q: n_q heads, k: n_kv heads, W = heads * d channels):
k0 W + W (depthwise + bias) and k1 heads d^2 + W (grouped + bias), plus n_kv temperatures. The paper's
footnote, 2 e k_seq + e^2 / h k_ch, halves the grouped term for CCA; the shapes reproduce the digest's
worked numbers (CCA-4x at E = 2048: 4.46M), the footnote does not (4.33M).

`spkv` (Self-Pruned KV, attention/spkv.py) gates the latent keys outside a local window with a utility
predictor on the mixer's input; decode then keeps k^ and v in a pruned cache (attention/pruned_cache.py), read up
to each (sequence, KV head)'s held length. Any layer takes a cache policy (attention/cache_policies.py) instead of
its dense cache: SP-KV's on an SP-KV layer, or a baseline at a budget of keys (`init_cache(..., policy=...)`).
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import Field

from attention import ops
from attention.base import MixerConfig, MixerContext, visible_keys_per_query
from attention import cache_policies, pruned_cache, spkv
from attention.cache_policies import CachePolicy
from attention.spkv import SPKVConfig, SPKVGate
from attention.layers import Linear, apply_rope, delay, l2_normalize, param, positions_from_segments

# eps inside the rsqrt of the QK L2 norm (the value the reference layers use).
L2_EPS = 1e-12


class CCAConfig(MixerConfig):
    kind: Literal["cca"] = "cca"
    n_heads: int = Field(4, ge=1)  # query heads n_q
    n_kv_heads: Optional[int] = Field(None, ge=1)  # None: n_heads (CCA); a divisor of n_heads: CCGQA
    head_dim: int = Field(64, ge=1)  # latent head dim d (kept at a normal size; fewer heads compress)
    k0: int = Field(2, ge=0)  # taps of the depthwise time conv (0: no such conv); ZAYA1 uses 2
    k1: int = Field(2, ge=0)  # taps of the per-head d x d time conv (0: no such conv); ZAYA1 uses 2
    conv_bias: bool = True
    qk_mean: bool = True
    value_shift: bool = True
    rope_fraction: float = Field(0.5, ge=0.0, le=1.0)  # share of d rotated when the model uses RoPE (ZAYA1: 0.5)
    temp_clamp: Optional[float] = None  # None: beta = exp(t); else exp(min(t, temp_clamp)) (vLLM's ZAYA1 uses 2)
    spkv: Optional[SPKVConfig] = None  # None: every key stays in the cache

    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def conv_rows(self) -> int:
        """P: raw latent rows of history the two convs read (the decode window)."""
        return max(self.k0 - 1, 0) + max(self.k1 - 1, 0)

    def rotary_dim(self, ctx: MixerContext) -> int:
        return round(self.rope_fraction * self.head_dim) if ctx.pos == "rope" else 0

    def check(self, ctx: MixerContext) -> list[str]:
        errs = []
        Hq, Hkv, d = self.n_heads, self.kv_heads(), self.head_dim
        if Hq % Hkv:
            errs.append(f"n_kv_heads: n_heads {Hq} is not divisible by n_kv_heads {Hkv}")
        if self.value_shift and (Hkv * d) % 2:
            errs.append(f"value_shift: half of the n_kv_heads * head_dim = {Hkv} * {d} value channels take the "
                        "previous token, so the product must be even (or set value_shift: false)")
        rotated = self.rope_fraction * d
        if ctx.pos == "rope" and (abs(rotated - round(rotated)) > 1e-9 or round(rotated) % 2):
            errs.append(f"rope_fraction: {self.rope_fraction} * head_dim {d} = {rotated:g} rotated channels; "
                        "RoPE needs an even whole number (e.g. rope_fraction 0.5 with head_dim a multiple of 4)")
        if self.spkv is not None:
            errs += self.spkv.check(ctx)
        return errs


def _uniform(bound: float):
    return lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class CausalConvStack(nnx.Module):
    """conv1 (depthwise, k0 taps) then conv2 (per head, d x d per tap, k1 taps) over time, fp32.

    Tap j reaches back k - 1 - j tokens (the last tap is the current token). Rows before the document
    start read zeros from the input, and conv2 reads conv1's output there: b0, the single-pad semantics.
    """

    def __init__(self, n_heads: int, d: int, k0: int, k1: int, *, bias: bool, axis: str, rngs: nnx.Rngs):
        # Zyphra's training init is unpublished. Weights: PyTorch's Conv1d default (uniform +-1/sqrt(fan_in)),
        # what the public PyTorch ports start from; biases at zero as in the Megatron port. QK-norm follows,
        # so only the conv branch's size relative to the qk-mean skip matters.
        def weight(k, shape, axes, fan_in):
            return param(rngs, _uniform(fan_in ** -0.5), shape, axes) if k else None

        def bias_param(k):
            return param(None, jnp.zeros((n_heads, d)), (n_heads, d), (axis, None), decay=False) if k and bias else None

        self.w0 = weight(k0, (k0, n_heads, d), (None, axis, None), k0)
        self.b0 = bias_param(k0)
        self.w1 = weight(k1, (k1, n_heads, d, d), (None, axis, None, None), k1 * d)
        self.b1 = bias_param(k1)

    def __call__(self, u_BTHD: jax.Array, doc_pos_BT: jax.Array) -> jax.Array:
        a = u_BTHD.astype(jnp.float32)
        if self.w0 is not None:
            w0 = self.w0[...]
            k0 = w0.shape[0]
            a = sum(w0[j] * delay(a, k0 - 1 - j, doc_pos_BT) for j in range(k0))
            if self.b0 is not None:
                a = a + self.b0[...]
        if self.w1 is None:
            return a
        w1 = self.w1[...]
        k1 = w1.shape[0]
        pad_row = 0.0 if self.b0 is None else self.b0[...]
        c = sum(jnp.einsum("bthi,hoi->btho", delay(a, k1 - 1 - j, doc_pos_BT, pad_row), w1[j])
                for j in range(k1))
        return c if self.b1 is None else c + self.b1[...]


class CCAttention(nnx.Module):
    stat_reporters = (spkv.report,)

    def __init__(self, cfg: CCAConfig, ctx: MixerContext, *, rngs: nnx.Rngs):
        self.cfg, self.ctx = cfg, ctx
        E, Hq, Hkv, d = ctx.d_model, cfg.n_heads, cfg.kv_heads(), cfg.head_dim
        self.Hq, self.Hkv, self.d = Hq, Hkv, d
        lin = dict(bias=ctx.bias, std=ctx.init_std, dtype=ctx.dtype, rngs=rngs)
        self.q_proj = Linear(E, Hq * d, axes=("embed", "heads"), **lin)
        self.k_proj = Linear(E, Hkv * d, axes=("embed", "kv_heads"), **lin)
        # With value_shift, columns [Hkv*d/2:] are the previous-token projection: independent weights
        # applied to x[t-1], computed as this matmul shifted by one row.
        self.v_proj = Linear(E, Hkv * d, axes=("embed", "kv_heads"), **lin)
        self.o_proj = Linear(Hq * d, E, axes=("heads", "embed"), **{**lin, "std": ctx.out_std})
        conv = dict(bias=cfg.conv_bias, rngs=rngs)
        self.q_conv = CausalConvStack(Hq, d, cfg.k0, cfg.k1, axis="heads", **conv)
        self.k_conv = CausalConvStack(Hkv, d, cfg.k0, cfg.k1, axis="kv_heads", **conv)
        self.log_temp = param(None, jnp.zeros((Hkv,)), (Hkv,), ("kv_heads",), decay=False)
        self.spkv = SPKVGate(cfg.spkv, ctx, Hkv, rngs=rngs) if cfg.spkv is not None else None
        self.rotary_dim = cfg.rotary_dim(ctx)
        self.P = cfg.conv_rows()
        self.shift_from = Hkv * d // 2 if cfg.value_shift else None

    # -- pieces shared by the forward and decode ------------------------------------------------

    def _latents(self, x_BTD):
        B, T, _ = x_BTD.shape
        q0 = self.q_proj(x_BTD).reshape(B, T, self.Hq, self.d)
        k0 = self.k_proj(x_BTD).reshape(B, T, self.Hkv, self.d)
        return q0, k0, self.v_proj(x_BTD)

    def _shift_fill(self):
        """What the delayed value half reads before a document starts: the projection of a zero row."""
        b = self.v_proj.bias
        return 0.0 if b is None else b[...][self.shift_from:].astype(self.ctx.dtype)

    def _finish_qk(self, cq_BTHD, ck_BTHD, q0_BTHD, k0_BTHD, positions_BT):
        """qk-mean, L2 norm to sqrt(d), key temperature and RoPE on the conv outputs of the same rows."""
        f32 = jnp.float32
        if self.cfg.qk_mean:
            B, T = q0_BTHD.shape[:2]
            q0_BTKGD = q0_BTHD.astype(f32).reshape(B, T, self.Hkv, self.Hq // self.Hkv, self.d)
            k0_BTKD = k0_BTHD.astype(f32)
            cq_BTHD = cq_BTHD + 0.5 * (q0_BTKGD + k0_BTKD[:, :, :, None]).reshape(cq_BTHD.shape)
            ck_BTHD = ck_BTHD + 0.5 * (q0_BTKGD.mean(3) + k0_BTKD)
        temp = self.log_temp[...]
        if self.cfg.temp_clamp is not None:
            temp = jnp.minimum(temp, self.cfg.temp_clamp)
        q = l2_normalize(cq_BTHD, L2_EPS) * math.sqrt(self.d)
        k = l2_normalize(ck_BTHD, L2_EPS) * (math.sqrt(self.d) * jnp.exp(temp)[:, None])
        if self.rotary_dim:
            q = apply_rope(q, positions_BT, self.ctx.rope_theta, self.rotary_dim)
            k = apply_rope(k, positions_BT, self.ctx.rope_theta, self.rotary_dim)
        return q.astype(self.ctx.dtype), k.astype(self.ctx.dtype)

    def _values(self, v_BTW, v_prev_BTW):
        """[current half | previous-token half] -> [B,T,Hkv,d]."""
        if self.shift_from is not None:
            v_BTW = jnp.concatenate([v_BTW[..., :self.shift_from], v_prev_BTW], axis=-1)
        return v_BTW.reshape(v_BTW.shape[:2] + (self.Hkv, self.d))

    # -- mixer protocol ---------------------------------------------------------------------------

    def __call__(self, x_BTD: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        B, T, _ = x_BTD.shape
        doc_pos_BT = positions_from_segments(segment_ids) if segment_ids is not None else \
            jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        q0, k0, v_BTW = self._latents(x_BTD)
        q, k = self._finish_qk(self.q_conv(q0, doc_pos_BT), self.k_conv(k0, doc_pos_BT), q0, k0, positions)
        v_prev = None
        if self.shift_from is not None:
            v_prev = delay(v_BTW[..., self.shift_from:], 1, doc_pos_BT, self._shift_fill())
        v = self._values(v_BTW, v_prev)
        gate = None if self.spkv is None else self.spkv(x_BTD, segment_ids)
        o = ops.softmax_attention(q, k, v, causal=True, local_window=None if gate is None else self.spkv.window,
                                  key_log_gate=gate, segment_ids=segment_ids, scale=self.d ** -0.5,
                                  impl=self.ctx.impl)
        return self.o_proj(o.reshape(B, T, self.Hq * self.d))

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32, policy: CachePolicy | None = None) -> dict:
        """Latent k^, v per position, or a pruned cache of them under `policy` (by default SP-KV's on an SP-KV
        layer), plus the constant state: the last P raw q/k latent rows (zeros reproduce the single left pad) and
        the previous token's shifted value projection."""
        dims = {"k": self.d, "v": self.d}
        if policy is None and self.spkv is not None:
            policy = CachePolicy("spkv")
        if policy is not None:
            cache = cache_policies.init(policy, batch, self.Hkv, dims, dtype, max_len, spkv=self.cfg.spkv)
        else:
            cache = {name: jnp.zeros((batch, max_len, self.Hkv, dim), dtype) for name, dim in dims.items()}
        cache["q_window"] = jnp.zeros((batch, self.P, self.Hq, self.d), dtype)
        cache["k_window"] = jnp.zeros((batch, self.P, self.Hkv, self.d), dtype)
        if self.shift_from is not None:
            fill = jnp.broadcast_to(self._shift_fill(), (batch, self.Hkv * self.d - self.shift_from))
            cache["v_shift"] = fill.astype(dtype)
        return cache

    def decode(self, x_B1D: jax.Array, cache: dict, position: jax.Array) -> tuple[jax.Array, dict]:
        B = x_B1D.shape[0]
        q0, k0, v_B1W = self._latents(x_B1D)
        q_win = jnp.concatenate([cache["q_window"], q0.astype(cache["q_window"].dtype)], axis=1)
        k_win = jnp.concatenate([cache["k_window"], k0.astype(cache["k_window"].dtype)], axis=1)
        # Window rows carry their true positions, so rows before the sequence start are masked as in the
        # forward; only the last row (whose whole receptive field is in the window) is kept.
        win_pos = jnp.broadcast_to(position - self.P + jnp.arange(self.P + 1, dtype=jnp.int32), (B, self.P + 1))
        cq = self.q_conv(q_win, win_pos)[:, -1:]
        ck = self.k_conv(k_win, win_pos)[:, -1:]
        q, k = self._finish_qk(cq, ck, q0, k0, jnp.full((B, 1), position, jnp.int32))
        v_prev = None
        if self.shift_from is not None:
            v_prev = cache["v_shift"][:, None].astype(v_B1W.dtype)
        v = self._values(v_B1W, v_prev)
        policy = cache.get("policy")
        if policy is None:
            new = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], e.astype(cache[name].dtype), position,
                                                             axis=1) for name, e in (("k", k), ("v", v))}
            lengths, pages = jnp.full((B, self.Hkv), position + 1, jnp.int32), None
        else:
            gate = {} if self.spkv is None else self.spkv.cache_gate(x_B1D)
            new = cache_policies.append(cache, {"k": k, "v": v}, position, layer_idx=self.ctx.layer_idx, **gate)
            lengths, pages = pruned_cache.ring_lengths(new, position), pruned_cache.key_pages(new)
        new["q_window"], new["k_window"] = q_win[:, 1:], k_win[:, 1:]
        if self.shift_from is not None:
            new["v_shift"] = v_B1W[:, 0, self.shift_from:].astype(cache["v_shift"].dtype)
        o = ops.softmax_decode(q, new["k"], new["v"], lengths=lengths, pages=pages, scale=self.d ** -0.5,
                               impl=self.ctx.impl)
        if policy is not None:
            new = policy.observe(new, q, position, scale=self.d ** -0.5)
        return self.o_proj(o.reshape(B, 1, self.Hq * self.d)), new

    # -- analytic costs (paper Table II) ------------------------------------------------------------

    def schedule_values(self, step: int, total: int) -> dict[str, float]:
        return {} if self.spkv is None else self.spkv.schedule_values(step, total)

    def cache_bytes_per_token(self, dtype_bytes: int | None = None) -> int:
        """k^ and v: 2 n_kv d values per token."""
        return 2 * self.Hkv * self.d * (dtype_bytes or jnp.dtype(self.ctx.dtype).itemsize)

    def state_bytes(self, dtype_bytes: int | None = None) -> int:
        """Constant per-sequence state: P raw [q0 | k0] rows and the shifted half of one value row."""
        values = self.P * (self.Hq + self.Hkv) * self.d
        if self.shift_from is not None:
            values += self.Hkv * self.d - self.shift_from
        return values * (dtype_bytes or jnp.dtype(self.ctx.dtype).itemsize)

    def _conv_weights(self) -> int:
        """Conv weights of both sides, (n_q + n_kv)(k0 d + k1 d^2); also the conv MACs per token."""
        k0, k1, d = self.cfg.k0, self.cfg.k1, self.d
        return (self.Hq + self.Hkv) * (k0 * d + k1 * d * d)

    def n_params(self) -> int:
        E, Wq, Wkv = self.ctx.d_model, self.Hq * self.d, self.Hkv * self.d
        proj = 2 * E * Wq + 2 * E * Wkv + (Wq + 2 * Wkv + E if self.ctx.bias else 0)
        conv_bias = ((self.cfg.k0 > 0) + (self.cfg.k1 > 0)) * (Wq + Wkv) if self.cfg.conv_bias else 0
        return proj + self._conv_weights() + conv_bias + self.Hkv

    def flops_per_token(self, seq_len: int) -> float:
        """Projections, convs and latent attention (2 FLOPs per MAC; norms and elementwise terms left out)."""
        E, Wq, Wkv = self.ctx.d_model, self.Hq * self.d, self.Hkv * self.d
        proj = 2 * E * (Wq + 2 * Wkv) + 2 * Wq * E
        flops = proj + 2 * self._conv_weights() + 4 * Wq * visible_keys_per_query(seq_len, None)
        return flops + (0 if self.spkv is None else self.spkv.flops_per_token())

