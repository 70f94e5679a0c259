"""Building blocks shared by the model and the mixers: linear maps, embeddings, norms, MLPs, RoPE,
L2 normalisation, positions from segments and the causal depthwise convolution.

The bottom of the model code: it imports only jax and flax, so both the mixers (`attention/`) and the
model (`lm/model.py`) build on it.

Every parameter is an `nnx.Param` carrying `axes=` (logical axis names: embed, heads, kv_heads, mlp,
vocab, layers, or None) so the mesh can shard it; `decay=False` keeps it out of weight decay and
`lr_mult=` scales its learning rate. Parameters are stored in fp32; compute runs in `dtype`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs | None, init, shape: Sequence[int], axes: Sequence[str | None], **meta: Any) -> nnx.Param:
    """An fp32 parameter with logical axes; `init(key, shape)` or a constant array."""
    assert len(axes) == len(shape), (shape, axes)
    value = init(rngs.params(), tuple(shape)) if callable(init) else jnp.asarray(init, jnp.float32)
    return nnx.Param(value.astype(jnp.float32), axes=tuple(axes), **meta)


def normal(std: float):
    return lambda key, shape: std * jax.random.normal(key, shape, jnp.float32)


def zeros(key, shape):
    return jnp.zeros(shape, jnp.float32)


def ones(key, shape):
    return jnp.ones(shape, jnp.float32)


def dense(x: jax.Array, w: jax.Array, **dot_kw: Any) -> jax.Array:
    """x [..., d_in] @ w [d_in, d_out] as one 2-D matmul over the flattened leading axes.

    The weight gradient of a 3-D jnp.dot contracts two axes (batch and time); XLA:CPU lowers that by
    materialising a transposed copy of the activation gradient, fused into its producer (the GELU
    backward) as a strided write that cost as much as the matmuls it feeds. Contracting one axis needs no copy.
    """
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w, **dot_kw)
    return y.reshape(*x.shape[:-1], w.shape[-1])


class Linear(nnx.Module):
    """y = x @ W (+ b), W [d_in, d_out] with logical axes `axes`."""

    def __init__(self, d_in: int, d_out: int, *, axes: tuple[str | None, str | None], rngs: nnx.Rngs,
                 bias: bool = False, std: float = 0.02, dtype=jnp.float32, **meta: Any):
        self.kernel = param(rngs, normal(std), (d_in, d_out), axes, **meta)
        self.bias = param(rngs, zeros, (d_out,), (axes[1],), decay=False, **meta) if bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = dense(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    def __init__(self, n: int, d: int, *, axes: tuple[str | None, str | None], rngs: nnx.Rngs, std: float = 0.02,
                 dtype=jnp.float32):
        self.embedding = param(rngs, normal(std), (n, d), axes, decay=False)
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the embedding table (tied output head)."""
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) over the last axis, in fp32 and without a learned scale (SRMSNorm)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    def __init__(self, d: int, *, eps: float = 1e-5, axes=("embed",), rngs: nnx.Rngs | None = None):
        self.scale = param(None, jnp.ones((d,)), (d,), axes, decay=False)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return (rms_normalize(x, self.eps) * self.scale[...]).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, d: int, *, eps: float = 1e-5, bias: bool = True, axes=("embed",), rngs: nnx.Rngs | None = None):
        self.scale = param(None, jnp.ones((d,)), (d,), axes, decay=False)
        self.bias = param(None, jnp.zeros((d,)), (d,), axes, decay=False) if bias else None
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)


def make_norm(kind: str, d: int, *, eps: float, bias: bool):
    if kind == "rmsnorm":
        return RMSNorm(d, eps=eps)
    return LayerNorm(d, eps=eps, bias=bias)


@jax.custom_jvp
def gelu_exact(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x) with Phi(x) = (1 + erf(x / sqrt 2)) / 2, written as torch's nn.GELU.

    Same function as jax.nn.gelu(approximate=False) to within 3 ulps of |x|, at half its cost on XLA:CPU:
    that one goes through erfc, whose expansion evaluates two branches and an exp for every element, and
    its autodiff keeps several full-size intermediates alive for the backward. The derivative here,
    Phi(x) + x * phi(x), is one elementwise pass and one saved array.
    """
    return x * _normal_cdf(x)


def _normal_cdf(x: jax.Array) -> jax.Array:
    return 0.5 * (1.0 + jax.lax.erf(x * (2.0 ** -0.5)))


@gelu_exact.defjvp
def _gelu_exact_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    cdf = _normal_cdf(x)
    pdf = jnp.exp(-0.5 * x * x) * (2.0 * jnp.pi) ** -0.5
    return x * cdf, dx * (cdf + x * pdf)


class MLP(nnx.Module):
    """SwiGLU (modern recipe) or GELU (GPT-2 recipe: exact erf GELU as torch's nn.GELU; gelu_tanh for the
    tanh approximation) feed-forward."""

    def __init__(self, d: int, hidden: int, *, kind: str, bias: bool, std: float, out_std: float, dtype, rngs: nnx.Rngs):
        self.kind = kind
        self.up = Linear(d, hidden, axes=("embed", "mlp"), bias=bias, std=std, dtype=dtype, rngs=rngs)
        self.gate = Linear(d, hidden, axes=("embed", "mlp"), bias=bias, std=std, dtype=dtype, rngs=rngs) \
            if kind == "swiglu" else None
        self.down = Linear(hidden, d, axes=("mlp", "embed"), bias=bias, std=out_std, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "swiglu":
            h = jax.nn.silu(self.gate(x)) * self.up(x)
        else:
            h = jax.nn.gelu(self.up(x), approximate=True) if self.kind == "gelu_tanh" else gelu_exact(self.up(x))
        return self.down(h)

    def flops_per_token(self) -> float:
        d, hidden = self.up.kernel.shape
        return 2.0 * d * hidden * (3 if self.kind == "swiglu" else 2)


def rope_tables(positions_BT: jax.Array, dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B,T,dim/2] in fp32 for integer positions."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BTHD: jax.Array, positions_BT: jax.Array, theta: float, rotary_dim: int | None = None) -> jax.Array:
    """Rotate the first `rotary_dim` channels of each head (half-split pairing: i with i + dim/2)."""
    d = x_BTHD.shape[-1]
    rd = d if rotary_dim is None else rotary_dim
    if rd == 0:
        return x_BTHD
    # The barrier makes the tables one computed array each. Without it XLA fuses the cos/sin into every
    # consumer, recomputing them per head and per use (forward, and again in the backward's RoPE
    # transpose): in the cpu_d512_l8 train step the backward's RoPE fusion took ~11 ms a layer, ~6.5 with it.
    cos, sin = jax.lax.optimization_barrier(rope_tables(positions_BT, rd, theta))
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x_BTHD.astype(jnp.float32)
    rot, rest = x32[..., :rd], x32[..., rd:]
    x1, x2 = rot[..., : rd // 2], rot[..., rd // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x_BTHD.dtype)


def positions_from_segments(segment_ids_BT: jax.Array) -> jax.Array:
    """Position of each token inside its document (resets at every segment change)."""
    T = segment_ids_BT.shape[1]
    idx = jnp.arange(T, dtype=jnp.int32)[None, :]
    start = jnp.concatenate([jnp.ones_like(segment_ids_BT[:, :1], bool),
                             segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    last_start = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
    return idx - last_start


def delay(x_BT_: jax.Array, steps: int, doc_pos_BT: jax.Array | None = None, fill=0.0) -> jax.Array:
    """x[t - steps] where that row lies in t's document (doc_pos_BT[t] >= steps; None: one document from t = 0),
    else `fill`."""
    if steps == 0:
        return x_BT_
    T = x_BT_.shape[1]
    if doc_pos_BT is None:
        doc_pos_BT = jnp.arange(T, dtype=jnp.int32)[None]
    pad = [(0, 0)] * x_BT_.ndim
    pad[1] = (steps, 0)
    shifted = jnp.pad(x_BT_, pad)[:, :T]
    keep = (doc_pos_BT >= steps).reshape(doc_pos_BT.shape + (1,) * (x_BT_.ndim - 2))
    return jnp.where(keep, shifted, fill)


def l2_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(sum(x^2) + eps) over the last axis, in fp32 (eps inside the square root)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)


def causal_conv(x_BTC: jax.Array, w_WC: jax.Array, history_BSC: jax.Array,
                pos_BT: jax.Array | None = None) -> jax.Array:
    """Depthwise causal conv in fp32: y_t = sum_j w[j] x_{t-(W-1)+j}, so the last tap hits x_t.

    `history` holds the W-1 inputs before x (zeros at a sequence start). With `pos_BT`, the position
    of each token inside its document, a tap reaching back past the document start reads zero. The
    forward pass and the decode step share this function, so both sum the taps in the same order.
    """
    W, T = w_WC.shape[0], x_BTC.shape[1]
    xx = jnp.concatenate([history_BSC.astype(jnp.float32), x_BTC.astype(jnp.float32)], axis=1)
    y = jnp.zeros(x_BTC.shape, jnp.float32)
    for j in range(W):
        tap = xx[:, j:j + T]
        back = W - 1 - j
        if pos_BT is not None and back:
            tap = jnp.where((pos_BT >= back)[..., None], tap, 0.0)
        y = y + w_WC[j] * tap
    return y
