"""Flash decode: one new query token per sequence against a KV cache, read in place in its own layout and dtype.

- The cache stays time-major ([B, S, Hkv, D], as the mixers keep it) and is viewed as [B, S, Hkv * D] (a free
  reshape): kv head h is the column block h, so no transpose or copy of the cache is ever made.
- All query heads of a GQA group form one tile ([G, D], padded to the target's smallest dot), so each key tile
  is read once per kv head, not once per query head.
- One array as both key and value (K=V) is read once per tile.
- Split-K: grid (batch, kv head, split); each split scans its stretch of S in key tiles with an online softmax
  and writes a normalised partial output and its log-sum-exp; the wrapper combines the splits. Splits give a
  long cache enough parallel programs when batch x kv heads is small.
- `bias` [B, Hkv, 1, S] fp32 carries validity (-inf) and the SP-KV key gate, so a pruned cache (ring + store,
  different keys per head) is read in place, masked, without a gather.

- Keys may be derived from the cached array inside the kernel (`KeyTransform`): RMS-normalised with a learned
  scale, then rotated by RoPE at each slot's own position. With K=V sharing the cache holds the raw shared
  projection (the values); deriving the keys in the kernel is what lets one read of the cache serve as both key
  and value, instead of writing a rotated copy of the whole cache and reading it again at every step. RoPE is
  folded into the scores without slicing lanes: q . rope(k) = q . (k cos) - rot(q) . (k sin), with
  rot(q) = [-q2, q1] computed once outside.

A stretch or tile past S is masked by position (its reads are padding), and values there are zeroed, since 0 x
NaN is NaN.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import platform
from kernels_pallas.flash import tiles

# (key tile, largest number of splits, num_warps) per target; a split is at least 4 key tiles.
DECODE_BLOCKS = {"cpu": (128, 4, 4), "gpu": (64, 32, 4), "tpu": (128, 8, 4)}
# The fewest query rows of a tile: Triton's dots need 16, TPU's sublanes 8.
MIN_ROWS = {"cpu": 1, "gpu": 16, "tpu": 8}


@dataclasses.dataclass(frozen=True)
class KeyTransform:
    """How the scores' keys follow from the cached array: k -> rope(rms_norm(k) * norm_scale, position), each
    step optional, in fp32. norm_scale [D] (None: no norm); rope_theta None: no rotation (positions unused)."""

    norm_eps: float | None = None       # None: no norm
    rope_theta: float | None = None     # None: no RoPE

    @property
    def rotates(self) -> bool:
        return self.rope_theta is not None


def _keys(k, tf: KeyTransform | None, norm_row, freq_row, pos_row):
    """(key tile for the dot with q, sine tile for the dot with rot(q) or None), both in k's dtype."""
    if tf is None:
        return k, None
    kf = k.astype(jnp.float32)
    if tf.norm_eps is not None:
        kf = kf * lax.rsqrt(jnp.mean(kf * kf, axis=1, keepdims=True) + tf.norm_eps) * norm_row
    if not tf.rotates:
        return kf.astype(k.dtype), None
    angle = pos_row.reshape(pos_row.shape[1], 1).astype(jnp.float32) * freq_row
    return (kf * jnp.cos(angle)).astype(k.dtype), (kf * jnp.sin(angle)).astype(k.dtype)


def _decode_kernel(*refs, kv_shared, transform, s_len, block_k, chunk, scale, heads, d, dv):
    """`heads` kv heads per program (1, except on a TPU whose head dim is no multiple of 128: there a block
    must span every head's columns); head hh reads columns [hh * d, (hh + 1) * d) of its block."""
    refs = list(refs)
    q_ref = refs.pop(0)
    qr_ref = refs.pop(0) if transform is not None and transform.rotates else None
    k_ref = refs.pop(0)
    v_ref = k_ref if kv_shared else refs.pop(0)
    bias_ref = refs.pop(0)
    norm_ref = refs.pop(0) if transform is not None and transform.norm_eps is not None else None
    freq_ref, pos_ref = (refs.pop(0), refs.pop(0)) if qr_ref is not None else (None, None)
    o_ref, lse_ref = refs
    split = pl.program_id(2)
    norm_row = None if norm_ref is None else norm_ref[...]
    freq_row = None if freq_ref is None else freq_ref[...]
    # Tiles of this split that start before S.
    n_tiles = jnp.minimum(chunk // block_k, lax.div(s_len - split * chunk + block_k - 1, block_k))
    for hh in range(heads):
        q = q_ref[hh]
        qr = None if qr_ref is None else qr_ref[hh]

        def body(t, carry, hh=hh, q=q, qr=qr):
            m, l, acc = carry
            keys = pl.ds(pl.multiple_of(t * block_k, block_k), block_k)
            pos = split * chunk + t * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
            inside = pos < s_len
            raw = k_ref[keys, pl.ds(hh * d, d)]
            v = raw if kv_shared else v_ref[keys, pl.ds(hh * dv, dv)]
            v = jnp.where(inside.reshape(block_k, 1), v, jnp.zeros_like(v))
            k, k_sin = _keys(raw, transform, norm_row, freq_row, None if pos_ref is None else pos_ref[hh, :, keys])
            s = tiles.dot(q, k, contract=(1, 1))
            if k_sin is not None:
                s = s - tiles.dot(qr, k_sin, contract=(1, 1))
            s = jnp.where(inside, s * scale + bias_ref[hh, :, keys], -jnp.inf)
            return tiles.online_softmax_step(m, l, acc, s, v)

        rows = q.shape[0]
        init = (jnp.full((rows, 1), -jnp.inf, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
                jnp.zeros((rows, dv), jnp.float32))
        m, l, acc = lax.fori_loop(0, n_tiles, body, init)
        seen = l > 0
        l_safe = jnp.where(seen, l, 1.0)
        o_ref[hh] = acc / l_safe
        # -inf for a split that saw no key: its weight in the combine is exp(-inf) = 0.
        lse_ref[hh] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def flash_decode(q, k, v=None, bias=None, *, scale=None, key_transform: KeyTransform | None = None,
                 key_norm_scale=None, key_positions=None, block_k=None, splits=None, heads_per_block=None,
                 interpret=None):
    """q [B, 1, Hq, D]; k [B, S, Hkv, D] and v [B, S, Hkv, Dv] (v None: k is also the value); bias [B, S, Hkv]
    fp32 added to each logit (-inf: not readable by that head; None: every key) -> [B, 1, Hq, Dv] in q's dtype.
    A head that can read no key returns 0.

    key_transform derives the scores' keys from k in the kernel (norm with key_norm_scale [D], RoPE at
    key_positions [B, S, Hkv] int); values are always the cached array as stored. block_k, splits and
    heads_per_block override the target's choices (tests)."""
    tgt = platform.target()
    pref_k, max_splits, warps = DECODE_BLOCKS[tgt]
    B, _, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    Dv = D if v is None else v.shape[-1]
    G = Hq // Hkv
    rows = max(MIN_ROWS[tgt], 1 << max(0, (G - 1).bit_length()) if tgt != "cpu" else G)
    bk = block_k or min(pref_k, max(8, 1 << max(0, (S - 1).bit_length())))
    n_tiles = -(-S // bk)
    n_split = splits or max(1, min(max_splits, n_tiles // 4))
    chunk = -(-n_tiles // n_split) * bk
    n_split = -(-S // chunk)
    scale = float(D) ** -0.5 if scale is None else float(scale)
    tf = key_transform
    # A TPU block's last dim must be a multiple of 128 lanes or the whole row: narrower heads share a block.
    hb = heads_per_block or (Hkv if tgt == "tpu" and (D % 128 or Dv % 128) else 1)

    def per_head_rows(x_BHD):  # [B, Hkv * G, D] -> [B, Hkv, rows, D] in the cache dtype
        x = x_BHD.reshape(B, Hkv, G, D).astype(k.dtype)
        return jnp.pad(x, ((0, 0), (0, 0), (0, rows - G), (0, 0)))

    def per_key_rows(x_BSH, dtype):  # [B, S, Hkv] -> [B, Hkv, 1, S]
        return jnp.swapaxes(x_BSH.astype(dtype), 1, 2)[:, :, None, :]

    q_spec = pl.BlockSpec((None, hb, rows, D), lambda b, h, c: (b, h, 0, 0))
    key_row_spec = pl.BlockSpec((None, hb, 1, chunk), lambda b, h, c: (b, h, 0, c))
    whole_row = pl.BlockSpec((1, D), lambda b, h, c: (0, 0))
    inputs, specs = [per_head_rows(q[:, 0])], [q_spec]
    if tf is not None and tf.rotates:
        q1, q2 = q[:, 0, :, :D // 2], q[:, 0, :, D // 2:]
        inputs.append(per_head_rows(jnp.concatenate([-q2, q1], axis=-1)))
        specs.append(q_spec)
    inputs.append(k.reshape(B, S, Hkv * D))
    specs.append(pl.BlockSpec((None, chunk, hb * D), lambda b, h, c: (b, c, h)))
    if v is not None:
        inputs.append(v.reshape(B, S, Hkv * Dv))
        specs.append(pl.BlockSpec((None, chunk, hb * Dv), lambda b, h, c: (b, c, h)))
    inputs.append(per_key_rows(jnp.zeros((B, S, Hkv)) if bias is None else bias, jnp.float32))
    specs.append(key_row_spec)
    if tf is not None and tf.norm_eps is not None:
        inputs.append(key_norm_scale.astype(jnp.float32).reshape(1, D))
        specs.append(whole_row)
    if tf is not None and tf.rotates:
        inv_freq = 1.0 / (tf.rope_theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
        inputs += [jnp.concatenate([inv_freq, inv_freq]).reshape(1, D), per_key_rows(key_positions, jnp.int32)]
        specs += [whole_row, key_row_spec]
    out_shape = (jax.ShapeDtypeStruct((B, Hkv, n_split, rows, Dv), jnp.float32),
                 jax.ShapeDtypeStruct((B, Hkv, n_split, rows, 1), jnp.float32))
    out_specs = (pl.BlockSpec((None, hb, None, rows, Dv), lambda b, h, c: (b, h, c, 0, 0)),
                 pl.BlockSpec((None, hb, None, rows, 1), lambda b, h, c: (b, h, c, 0, 0)))
    kernel = functools.partial(_decode_kernel, kv_shared=v is None, transform=tf, s_len=S, block_k=bk, chunk=chunk,
                               scale=scale, heads=hb, d=D, dv=Dv)
    o_parts, lse_parts = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(B, Hkv // hb, n_split), in_specs=specs, out_specs=out_specs,
        interpret=platform.resolve_interpret(interpret), name="flash_decode",
        compiler_params=platform.compiler_params(gpu=dict(num_warps=warps, num_stages=2),
                                                 tpu=dict(dimension_semantics=("parallel",) * 3)),
    )(*inputs)
    # Combine the splits: weights exp(lse_c - max lse), all zero for a head that read nothing.
    m = jnp.max(lse_parts, axis=2, keepdims=True)
    w = jnp.exp(lse_parts - jnp.where(m == -jnp.inf, 0.0, m))
    total = jnp.sum(w, axis=2)
    o = jnp.sum(w * o_parts, axis=2) / jnp.where(total > 0, total, 1.0)
    return o[:, :, :G].reshape(B, 1, Hq, Dv).astype(q.dtype)
