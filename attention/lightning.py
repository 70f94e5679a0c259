"""The `lightning` mixer: TransNormerLLM / MiniMax-01 linear attention over `ops.lightning`.

    q, k = phi(x Wq), phi(x Wk);  v = x Wv (phi(x Wv) with feature_map_v, as in MiniMax)
    o_t  = scale * sum_{s<=t} lambda_h^(t-s) (q_t . k_s) v_s              per head h
    y    = (Norm(concat_heads(o)) * sigmoid(gate(x))) Wo

phi is SiLU by default (TNL ablation: Swish 2.248, none 2.283, 1+elu 2.252). There is no softmax and,
as in the official kernels, TNL and MiniMax, no 1/sqrt(d) scale (`scale: 1.0`); the output is kept
bounded by the norm instead, which is why it is not optional: without it the output grows with the
context mass (lightning-attention #17/#25). The norm runs over the whole width, all heads together
(TNL SRMSNorm without a weight, MiniMax RMSNorm with one; lightning-attention #21), eps 1e-6 in both.
The gate is MiniMax's full-rank sigmoid(x Wg), or with `gate_rank` the low-rank d -> r -> width form
of OpenNLPLab's later `tnl_attn` module.

The decay lambda_h = exp(-s_h) is fixed per head and layer, never learned (the paper reports NaNs
when it was). Two published rules, with 0-based head h < H and layer l < L counted over the whole
model (hybrids included, as MiniMax does with L = 80):

- `decay: paper`: s = (8h/H) (1 - l/L), Eq. 10 of arXiv 2405.17381, indexed as fla's
  `chunk_lightning_attn` does. Head 0 gets s = 0, lambda = 1 (no decay, a plain running sum) in
  every layer. The paper does not say whether h starts at 0; we keep fla's reading so that runs
  match it, and the norm after attention is what keeps that head's growing sum usable.
- `decay: alibi` (default): s = a_h (1 - l/(L-1) + 1e-5) with ALiBi slopes a_h = 2^(-8(h+1)/H) when
  H is a power of 2 (otherwise the slopes of the nearest lower power of 2 p, then every other slope
  of 2p). This is what the released TNL (`_build_slope_tensor`) and MiniMax-01 code use. No head
  gets exactly lambda = 1: the +1e-5 leaves the last layer a decay of 1e-5 a_h, a running sum in all
  but name. With L = 1, l/(L-1) is taken as 0.

Rule `paper` follows TransNormerLLM (arXiv 2307.14995) and Lightning Attention-2 (arXiv 2401.04658);
`alibi` follows their released code. HF transformers' MiniMax
port uses a third one that differs from B for non-power-of-2 H and is not offered.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from pydantic import Field

from attention import ops
from attention.base import HeadsMixerConfig, MixerContext
from attention.ops.lightning.xla import block_size
from attention.layers import Linear, RMSNorm, rms_normalize

FEATURE_MAPS = {
    "silu": jax.nn.silu,
    "elu1": lambda x: 1.0 + jax.nn.elu(x),
    "none": lambda x: x,
}


class LightningConfig(HeadsMixerConfig):
    kind: Literal["lightning"] = "lightning"
    n_heads: int = Field(8, ge=1)
    head_dim: Optional[int] = Field(None, ge=1)  # None: d_model // n_heads (q, k and v heads alike)
    feature_map: Literal["silu", "elu1", "none"] = "silu"  # phi on q and k
    feature_map_v: bool = False  # phi on v too (MiniMax-01)
    decay: Literal["alibi", "paper"] = "alibi"
    scale: Optional[float] = Field(1.0, gt=0)  # None: head_dim ** -0.5
    norm: Literal["rmsnorm", "srmsnorm"] = "rmsnorm"  # over all heads; srmsnorm has no weight (TNL)
    norm_eps: float = Field(1e-6, gt=0)
    gate_rank: Optional[int] = Field(None, ge=1)  # None: full-rank sigmoid gate (MiniMax)


def alibi_slopes(n_heads: int) -> np.ndarray:
    """ALiBi slopes [H]: 2^(-8(h+1)/H) for a power-of-2 H; otherwise those of the nearest lower power
    of 2 p followed by every other slope of 2p."""
    p = 2 ** int(math.floor(math.log2(n_heads)))
    base = 2.0 ** (-8.0 * np.arange(1, p + 1) / p)
    extra = 2.0 ** (-8.0 * np.arange(1, 2 * p + 1, 2) / (2 * p))
    return np.concatenate([base, extra[: n_heads - p]])


def decay_slopes(rule: str, n_heads: int, layer_idx: int, n_layers: int) -> np.ndarray:
    """s [H] >= 0 (float64), lambda = exp(-s), for 0-based `layer_idx` of `n_layers`; see the module docstring."""
    if rule == "paper":
        return 8.0 * np.arange(n_heads) / n_heads * (1.0 - layer_idx / n_layers)
    depth = layer_idx / (n_layers - 1) if n_layers > 1 else 0.0
    return alibi_slopes(n_heads) * (1.0 - depth + 1e-5)


class LightningAttention(nnx.Module):
    stat_reporters = ()

    def __init__(self, cfg: LightningConfig, ctx: MixerContext, *, rngs: nnx.Rngs):
        self.cfg, self.ctx = cfg, ctx
        d, H, hd = ctx.d_model, cfg.n_heads, cfg.dim(ctx.d_model)
        self.H, self.hd = H, hd
        width = H * hd
        lin = dict(bias=ctx.bias, std=ctx.init_std, dtype=ctx.dtype, rngs=rngs)
        self.q_proj = Linear(d, width, axes=("embed", "heads"), **lin)
        self.k_proj = Linear(d, width, axes=("embed", "heads"), **lin)
        self.v_proj = Linear(d, width, axes=("embed", "heads"), **lin)
        r = cfg.gate_rank
        self.gate = nnx.List([Linear(d, width, axes=("embed", "heads"), **lin)] if r is None else
                             [Linear(d, r, axes=("embed", None), **lin), Linear(r, width, axes=(None, "heads"), **lin)])
        self.out_norm = RMSNorm(width, eps=cfg.norm_eps, axes=("heads",)) if cfg.norm == "rmsnorm" else None
        self.o_proj = Linear(width, d, axes=("heads", "embed"), **{**lin, "std": ctx.out_std})
        # A static tuple, not an array: the decay is a constant of the architecture and must stay out
        # of the parameter state (and so out of the optimizer and checkpoints).
        self.log_decay = tuple(float(-s) for s in decay_slopes(cfg.decay, H, ctx.layer_idx, ctx.n_layers))

    def _project(self, x_BTD: jax.Array):
        B, T, _ = x_BTD.shape
        phi = FEATURE_MAPS[self.cfg.feature_map]
        q = phi(self.q_proj(x_BTD)).reshape(B, T, self.H, self.hd)
        k = phi(self.k_proj(x_BTD)).reshape(B, T, self.H, self.hd)
        v = self.v_proj(x_BTD)
        v = (phi(v) if self.cfg.feature_map_v else v).reshape(B, T, self.H, self.hd)
        return q, k, v

    def _output(self, o_BTHV: jax.Array, x_BTD: jax.Array) -> jax.Array:
        B, T = o_BTHV.shape[:2]
        o = o_BTHV.reshape(B, T, self.H * self.hd)
        o = rms_normalize(o, self.cfg.norm_eps) if self.out_norm is None else self.out_norm(o)
        g = x_BTD
        for lin in self.gate:
            g = lin(g)
        y = o.astype(jnp.float32) * jax.nn.sigmoid(g.astype(jnp.float32))
        return self.o_proj(y.astype(self.ctx.dtype))

    def _log_decay(self) -> jax.Array:
        return jnp.asarray(self.log_decay, jnp.float32)

    def __call__(self, x_BTD: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        q, k, v = self._project(x_BTD)
        o, _ = ops.lightning(q, k, v, self._log_decay(), scale=self.cfg.scale, segment_ids=segment_ids,
                             impl=self.ctx.impl)
        return self._output(o, x_BTD)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        return {"state": jnp.zeros((batch, self.H, self.hd, self.hd), jnp.float32)}

    def decode(self, x_B1D: jax.Array, cache: dict, position: jax.Array) -> tuple[jax.Array, dict]:
        q, k, v = self._project(x_B1D)
        o, state = ops.lightning(q, k, v, self._log_decay(), scale=self.cfg.scale, initial_state=cache["state"],
                                 output_final_state=True, impl=self.ctx.impl)
        return self._output(o, x_B1D), {"state": state}

    def schedule_values(self, step: int, total: int) -> dict[str, float]:
        return {}

    def cache_bytes_per_token(self, dtype_bytes: int | None = None) -> int:
        """Constant state: nothing grows with the sequence."""
        return 0

    def state_bytes(self) -> int:
        """The fp32 state [H, head_dim, head_dim] per sequence, whatever the context length."""
        return self.H * self.hd * self.hd * 4

    def flops_per_token(self, seq_len: int) -> float:
        """Projections plus the Lightning-2 block-wise op at the block size the op uses on this backend.

        Per head and token, with block C: intra 2C(dk + dv) (the whole C x C tile of q.k and its
        product with v, as the blocked algorithm computes and then masks it) and inter 4 dk dv
        (reading the incoming state, q S, and adding the token to the state, k^T v). Norm, gate
        activation and decay factors are elementwise and not counted.
        """
        d, H, hd = self.ctx.d_model, self.H, self.hd
        width = H * hd
        r = self.cfg.gate_rank
        gate = 2 * d * width if r is None else 2 * r * (d + width)
        proj = 2 * d * 3 * width + gate + 2 * width * d
        C = min(block_size(), seq_len)
        return proj + H * (2 * C * (hd + hd) + 4 * hd * hd)
