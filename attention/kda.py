"""The `kda` mixer: Kimi Delta Attention (Kimi Linear, arXiv 2510.26692) over `ops.kda`.

The layer of the Kimi Linear paper, §4 (as in FLA `layers/kda.py` and the vLLM layer of the released
checkpoint):

    q, k, v = SiLU(conv_W(x Wq)), SiLU(conv_W(x Wk)), SiLU(conv_W(x Wv))   depthwise causal, W = 4
    q, k    = L2-normalised per head, in fp32, x / sqrt(sum x^2 + 1e-6)
    g       = -exp(A_log_h) * softplus(f_b(f_a(x)) + dt_bias)              [B,T,H,dk], fp32, <= 0
    beta    = sigmoid(x Wb)                                                [B,T,H]
    o       = KDA(q, k, v, g, beta; scale = dk^-1/2)
    y       = (RMSNorm_head(o) * sigmoid(g_b(g_a(x)))) Wo

f_a: d -> dk and g_a: d -> dv are low rank with rank = head dim. A_log [H] starts at log U[1, 16]
and dt_bias [H*dk] at softplus^-1(dt) with dt = exp(U[log 1e-3, log 0.1]) clamped to >= 1e-4; both
are fp32 and never weight-decayed (`never_decay`). Value heads equal qk heads (Kimi: 32 x 128) and
dv = dk. Biases follow `model.bias` (none in the released checkpoint).

Packed documents: the op resets the state at a document start, and the short convolutions read zero
for taps that reach back past it, so nothing crosses a boundary. Decoding keeps the fp32 state and,
per conv, the last W-1 raw projections (before conv and SiLU).
"""
from __future__ import annotations

from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from pydantic import Field

from attention import ops
from attention.base import HeadsMixerConfig, MixerContext
from attention.ops.kda.xla import CHUNK
from attention.layers import Linear, RMSNorm, causal_conv, l2_normalize, normal, param, positions_from_segments

_F32 = jnp.float32
_L2_EPS = 1e-6  # inside the sqrt, as FLA's in-kernel l2norm
_A_RANGE = (1.0, 16.0)
_DT_RANGE = (1e-3, 0.1)
_DT_FLOOR = 1e-4


class KDAConfig(HeadsMixerConfig):
    kind: Literal["kda"] = "kda"
    n_heads: int = Field(8, ge=1)
    head_dim: Optional[int] = Field(None, ge=1)  # None: d_model // n_heads; dk = dv = head_dim
    conv_size: int = Field(4, ge=2)  # depthwise causal short conv on q, k, v
    scale: Optional[float] = Field(None, gt=0)  # None: head_dim ** -0.5
    norm_eps: Optional[float] = Field(None, gt=0)  # output RMSNorm eps; None: model.norm_eps
    # Short-conv weights at init: "uniform" is PyTorch's Conv1d default for a depthwise kernel,
    # U(-1/sqrt(W), 1/sqrt(W)), what fla's KDA layer gets on its own; "normal" is N(0, model.init_std), what
    # fla's model init (`_init_weights`, every nn.Conv1d) then overwrites it with in a full fla model.
    conv_init: Literal["uniform", "normal"] = "uniform"


def _uniform(lo: float, hi: float):
    return lambda key, shape: jax.random.uniform(key, shape, _F32, lo, hi)


def _a_log_init(key, shape):
    return jnp.log(_uniform(*_A_RANGE)(key, shape))


def _dt_bias_init(key, shape):
    lo, hi = np.log(_DT_RANGE[0]), np.log(_DT_RANGE[1])
    dt = jnp.maximum(jnp.exp(_uniform(lo, hi)(key, shape)), _DT_FLOOR)
    return dt + jnp.log(-jnp.expm1(-dt))  # softplus^-1(dt)


class KimiDeltaAttention(nnx.Module):
    stat_reporters = ()

    def __init__(self, cfg: KDAConfig, ctx: MixerContext, *, rngs: nnx.Rngs):
        self.cfg, self.ctx = cfg, ctx
        d, H, hd, W = ctx.d_model, cfg.n_heads, cfg.dim(ctx.d_model), cfg.conv_size
        self.H, self.hd, self.W = H, hd, W
        width = H * hd
        lin = dict(bias=ctx.bias, std=ctx.init_std, dtype=ctx.dtype, rngs=rngs)
        self.q_proj = Linear(d, width, axes=("embed", "heads"), **lin)
        self.k_proj = Linear(d, width, axes=("embed", "heads"), **lin)
        self.v_proj = Linear(d, width, axes=("embed", "heads"), **lin)
        conv_init = _uniform(-W ** -0.5, W ** -0.5) if cfg.conv_init == "uniform" else normal(ctx.init_std)
        conv = lambda: param(rngs, conv_init, (W, width), (None, "heads"))
        self.q_conv, self.k_conv, self.v_conv = conv(), conv(), conv()
        self.f_a = Linear(d, hd, axes=("embed", None), **lin)
        self.f_b = Linear(hd, width, axes=(None, "heads"), **lin)
        self.A_log = param(rngs, _a_log_init, (H,), ("heads",), decay=False, never_decay=True)
        self.dt_bias = param(rngs, _dt_bias_init, (width,), ("heads",), decay=False, never_decay=True)
        self.b_proj = Linear(d, H, axes=("embed", "heads"), **lin)
        self.g_a = Linear(d, hd, axes=("embed", None), **lin)
        self.g_b = Linear(hd, width, axes=(None, "heads"), **lin)
        self.o_norm = RMSNorm(hd, eps=cfg.norm_eps or ctx.norm_eps, axes=(None,))
        self.o_proj = Linear(width, d, axes=("heads", "embed"), **{**lin, "std": ctx.out_std})

    def _convs(self):
        return (("q", self.q_proj, self.q_conv), ("k", self.k_proj, self.k_conv), ("v", self.v_proj, self.v_conv))

    def _inputs(self, x_BTD: jax.Array, qkv: dict[str, jax.Array]):
        """The op's inputs from the conv outputs `qkv` and x: heads split, q and k L2-normalised, g, beta."""
        B, T, _ = x_BTD.shape
        heads = lambda a: a.reshape(B, T, self.H, self.hd)
        q, k = l2_normalize(heads(qkv["q"]), _L2_EPS), l2_normalize(heads(qkv["k"]), _L2_EPS)
        v = heads(qkv["v"]).astype(self.ctx.dtype)
        f = self.f_b(self.f_a(x_BTD)).astype(_F32) + self.dt_bias[...]
        g = -jnp.exp(self.A_log[...])[:, None] * jax.nn.softplus(heads(f))
        beta = jax.nn.sigmoid(self.b_proj(x_BTD).astype(_F32))
        return q, k, v, g, beta

    def _output(self, o_BTHV: jax.Array, x_BTD: jax.Array) -> jax.Array:
        B, T = o_BTHV.shape[:2]
        gate = jax.nn.sigmoid(self.g_b(self.g_a(x_BTD)).astype(_F32)).reshape(o_BTHV.shape)
        y = self.o_norm(o_BTHV).astype(_F32) * gate
        return self.o_proj(y.reshape(B, T, self.H * self.hd).astype(self.ctx.dtype))

    def __call__(self, x_BTD: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        B, T, _ = x_BTD.shape
        pos = None if segment_ids is None else positions_from_segments(segment_ids)
        history = jnp.zeros((B, self.W - 1, self.H * self.hd), _F32)
        qkv = {n: jax.nn.silu(causal_conv(proj(x_BTD), w[...], history, pos)) for n, proj, w in self._convs()}
        q, k, v, g, beta = self._inputs(x_BTD, qkv)
        o, _ = ops.kda(q, k, v, g, beta, scale=self.cfg.scale, segment_ids=segment_ids, impl=self.ctx.impl)
        return self._output(o, x_BTD)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        cache = {"state": jnp.zeros((batch, self.H, self.hd, self.hd), _F32)}
        for n, _, _ in self._convs():
            cache[f"{n}_conv"] = jnp.zeros((batch, self.W - 1, self.H * self.hd), dtype)
        return cache

    def decode(self, x_B1D: jax.Array, cache: dict, position: jax.Array) -> tuple[jax.Array, dict]:
        new_cache, qkv = {}, {}
        for n, proj, w in self._convs():
            raw = proj(x_B1D)
            hist = cache[f"{n}_conv"]
            qkv[n] = jax.nn.silu(causal_conv(raw, w[...], hist))
            new_cache[f"{n}_conv"] = jnp.concatenate([hist[:, 1:], raw.astype(hist.dtype)], axis=1)
        q, k, v, g, beta = self._inputs(x_B1D, qkv)
        o, new_cache["state"] = ops.kda(q, k, v, g, beta, scale=self.cfg.scale, initial_state=cache["state"],
                                        output_final_state=True, impl=self.ctx.impl)
        return self._output(o, x_B1D), new_cache

    def schedule_values(self, step: int, total: int) -> dict[str, float]:
        return {}

    def cache_bytes_per_token(self, dtype_bytes: int | None = None) -> int:
        """Constant state: nothing grows with the sequence."""
        return 0

    def state_bytes(self) -> int:
        """fp32 state [H, dk, dv] plus three conv histories of W-1 raw projections in the compute dtype."""
        width = self.H * self.hd
        return self.H * self.hd * self.hd * 4 + 3 * (self.W - 1) * width * jnp.dtype(self.ctx.dtype).itemsize

    def flops_per_token(self, seq_len: int) -> float:
        """Projections, short convs and the chunked op.

        The op counts the paper's Eq. 13 per head, 6 dh^2 + 3 C dh + C^2 per token at the op's chunk
        C = 64: the same units as the softmax mixer's 2 T dh per token (Eq. 13 sets KDA against
        2 T^2 dh for full attention). Norms, gate activations and decay factors are not counted.
        """
        d, H, hd, W = self.ctx.d_model, self.H, self.hd, self.W
        width = H * hd
        proj = 2 * d * 3 * width + 2 * width * d  # q, k, v, o
        low_rank = 2 * 2 * (d * hd + hd * width)  # f_a f_b and g_a g_b
        proj += low_rank + 2 * d * H  # beta
        conv = 2 * W * 3 * width
        C = CHUNK
        return proj + conv + H * (6 * hd * hd + 3 * C * hd + C * C)
