"""Flash decode: one new query token per sequence against a KV cache, read in place in its own layout and dtype.

- The cache stays time-major ([B, S, Hkv, D], as the mixers keep it) and is viewed as [B, S, Hkv * D] (a free
  reshape): kv head h is the column block h, so no transpose or copy of the cache is ever made.
- All query heads of a GQA group form one tile ([G, D], padded to the target's smallest dot), so each key tile
  is read once per kv head, not once per query head.
- One array as both key and value (K=V) is read once per tile.
- Split-K: grid (batch, kv head, split); each split scans its stretch of S in key tiles with an online softmax
  and writes a normalised partial output and its log-sum-exp; the wrapper combines the splits. Splits give a
  long cache enough parallel programs when batch x kv heads is small.
- Each (sequence, kv head) reads only its held slots [0, length): a split past a head's length does nothing, and a
  split that reaches it stops at its last held tile. On a GPU the bound is per head, read in the program (Triton
  loads only the tiles the loop reaches). On a TPU the lengths are scalar-prefetched: a split's block index is
  clamped to the last split that holds anything, so the pipeline fetches nothing new for the splits past it,
  and the loop inside stops at the head's length. A pruned cache (ring + store, each head at its own length)
  and a cache filled up to the current position cost what they hold, not what they allocate.
- `bias` [B, Hkv, 1, S] fp32 (optional) carries holes (-inf) and the SP-KV key gate.
- A paged store (`PagedKV`: a pool of pages shared by the batch's (sequence, kv head) pairs, a page table per
  pair) is a second source in the same softmax, read by its own kernel (`_paged_kernel`) whose partial outputs
  join the dense cache's splits in one combine. Each program is one (sequence, kv head, split) and reads only the
  pages its pair holds. On a GPU (and in interpret mode) a split loops over its stretch of the pair's page list
  and loads each page from the pool by the id in its table row. On a TPU a split is one page: the table is
  scalar-prefetched and the pool's index map picks the page, clamped to the pair's last held page past it (no new
  fetch), so the pipeline fetches exactly the held pages.

- Keys may be derived from the cached array inside the kernel (`KeyTransform`): RMS-normalised with a learned
  scale, then rotated by RoPE at each slot's own position. With K=V sharing the cache holds the raw shared
  projection (the values); deriving the keys in the kernel is what lets one read of the cache serve as both key
  and value, instead of writing a rotated copy of the whole cache and reading it again at every step. RoPE is
  folded into the scores without slicing lanes: q . rope(k) = q . (k cos) - rot(q) . (k sin), with
  rot(q) = [-q2, q1] computed once outside.

A tile that reaches past a head's length is masked by position (slots there may hold anything), and values
there are zeroed, since 0 x NaN is NaN.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import platform
from kernels_pallas.chunked import VMEM_LIMIT_BYTES
from kernels_pallas.flash import tiles

# (key tile, largest number of splits, num_warps) per target; a split is at least 4 key tiles.
DECODE_BLOCKS = {"cpu": (128, 4, 4), "gpu": (64, 32, 4), "tpu": (128, 8, 4)}
# The fewest query rows of a tile: Triton's dots need 16, TPU's sublanes 8.
MIN_ROWS = {"cpu": 1, "gpu": 16, "tpu": 8}
# On TPU a split is one block, copied whole into VMEM: at most this many keys, so that VMEM per grid step does not
# grow with the cache (a longer cache gets more splits; 2048 bf16 keys and values of 128 dims, double-buffered,
# are 2 MiB).
TPU_SPLIT_KEYS = 2048


@dataclasses.dataclass(frozen=True)
class KeyTransform:
    """How the scores' keys follow from the cached array: k -> rope(rms_norm(k) * norm_scale, position), each
    step optional, in fp32. norm_scale [D] (None: no norm); rope_theta None: no rotation (positions unused)."""

    norm_eps: float | None = None       # None: no norm
    rope_theta: float | None = None     # None: no RoPE

    @property
    def rotates(self) -> bool:
        return self.rope_theta is not None


class PagedKV(NamedTuple):
    """A paged store read beside the dense cache. k [P, page, D], v [P, page, Dv] (None: k is also the value);
    table [B, Hkv, n] int: the pages of each (sequence, kv head) in order; lengths [B, Hkv] int: the slots each
    pair holds (slot i is row i % page of page table[b, h, i // page]); positions [P, page] int: the slots' token
    positions, for rotated keys; bias [P, page] fp32 added to the slots' logits (None: nothing)."""

    k: Any
    v: Any
    table: Any
    lengths: Any
    positions: Any = None
    bias: Any = None


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


def _tile_step(carry, q, qr, raw, v, inside, bias_row, pos_row, *, transform, norm_row, freq_row, scale):
    """One key tile into a head's online softmax (m, l, acc): queries q [rows, D] (qr: rot(q) for RoPE), the
    cached keys raw [bk, D] and values v [bk, Dv], `inside` [1, bk] the slots the head holds (the others may hold
    anything: their scores are -inf and their values zeroed, since 0 x NaN is NaN), bias_row and pos_row [1, bk]
    or None."""
    m, l, acc = carry
    v = jnp.where(inside.reshape(raw.shape[0], 1), v, jnp.zeros_like(v))
    k, k_sin = _keys(raw, transform, norm_row, freq_row, pos_row)
    s = tiles.dot(q, k, contract=(1, 1))
    if k_sin is not None:
        s = s - tiles.dot(qr, k_sin, contract=(1, 1))
    s = s * scale
    if bias_row is not None:
        s = s + bias_row
    s = jnp.where(inside, s, -jnp.inf)
    return tiles.online_softmax_step(m, l, acc, s, v)


def _empty(rows: int, dv: int):
    return (jnp.full((rows, 1), -jnp.inf, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, dv), jnp.float32))


def _write(o_ref, lse_ref, index, carry):
    """A split's normalised output and log-sum-exp; -inf for a split that saw no key, so its weight in the combine
    is exp(-inf) = 0."""
    m, l, acc = carry
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[index] = acc / l_safe
    lse_ref[index] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def _pop_shared(refs, transform):
    """(norm row, freq row, the rest) of the refs after a kernel's key inputs: the norm scale and RoPE
    frequencies are whole [1, D] rows shared by every program."""
    norm_ref = refs.pop(0) if transform is not None and transform.norm_eps is not None else None
    freq_ref = refs.pop(0) if transform is not None and transform.rotates else None
    return (None if norm_ref is None else norm_ref[...]), (None if freq_ref is None else freq_ref[...]), refs


def _decode_kernel(*refs, kv_shared, transform, has_bias, prefetch, block_k, chunk, scale, heads, d, dv):
    """`heads` kv heads per program (1, except on a TPU whose head dim is no multiple of 128: there a block
    must span every head's columns); head hh reads columns [hh * d, (hh + 1) * d) of its block, up to its length
    (`lengths` scalar-prefetched [B, Hkv] with `prefetch`, else this program's [heads] block)."""
    refs = list(refs)
    len_ref = refs.pop(0) if prefetch else None
    if prefetch:
        refs.pop(0)  # the per-block maximum, read by the index maps only
    q_ref = refs.pop(0)
    qr_ref = refs.pop(0) if transform is not None and transform.rotates else None
    k_ref = refs.pop(0)
    v_ref = k_ref if kv_shared else refs.pop(0)
    bias_ref = refs.pop(0) if has_bias else None
    len_ref = len_ref if prefetch else refs.pop(0)
    norm_row, freq_row, refs = _pop_shared(refs, transform)
    pos_ref = refs.pop(0) if qr_ref is not None else None
    o_ref, lse_ref = refs
    start = pl.program_id(2) * chunk
    for hh in range(heads):
        q = q_ref[hh]
        qr = None if qr_ref is None else qr_ref[hh]
        length = len_ref[pl.program_id(0), pl.program_id(1) * heads + hh] if prefetch else len_ref[hh]
        # Tiles of this split that start before the head's length (none for a split past it).
        n_tiles = jnp.clip(lax.div(length - start + block_k - 1, block_k), 0, chunk // block_k)

        def body(t, carry, hh=hh, q=q, qr=qr, length=length):
            keys = pl.ds(pl.multiple_of(t * block_k, block_k), block_k)
            inside = start + t * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1) < length
            raw = k_ref[keys, pl.ds(hh * d, d)]
            return _tile_step(carry, q, qr, raw, raw if kv_shared else v_ref[keys, pl.ds(hh * dv, dv)], inside,
                              None if bias_ref is None else bias_ref[hh, :, keys],
                              None if pos_ref is None else pos_ref[hh, :, keys],
                              transform=transform, norm_row=norm_row, freq_row=freq_row, scale=scale)

        _write(o_ref, lse_ref, hh, lax.fori_loop(0, n_tiles, body, _empty(q.shape[0], dv)))


def _paged_kernel(*refs, kv_shared, transform, has_bias, prefetch, page, per_split, scale, dv):
    """One (sequence, kv head, split) of a paged store: pages [c * per_split, (c + 1) * per_split) of the pair's
    list, up to its length. With `prefetch` (TPU) the table and lengths are scalar-prefetched, a split is one page
    and its blocks are that page; else the pool arrays are whole blocks and each page is loaded by the id in this
    split's table row."""
    refs = list(refs)
    tab_ref, len_ref = (refs.pop(0), refs.pop(0)) if prefetch else (None, None)
    q_ref = refs.pop(0)
    qr_ref = refs.pop(0) if transform is not None and transform.rotates else None
    k_ref = refs.pop(0)
    v_ref = k_ref if kv_shared else refs.pop(0)
    bias_ref = refs.pop(0) if has_bias else None
    if not prefetch:
        len_ref, tab_ref = refs.pop(0), refs.pop(0)
    norm_row, freq_row, refs = _pop_shared(refs, transform)
    pos_ref = refs.pop(0) if qr_ref is not None else None
    o_ref, lse_ref = refs
    length = len_ref[pl.program_id(0), pl.program_id(1)] if prefetch else len_ref[0]
    first = pl.program_id(2) * per_split
    n_tiles = jnp.clip(lax.div(length + page - 1, page) - first, 0, per_split)
    q = q_ref[...]
    qr = None if qr_ref is None else qr_ref[...]

    def page_of(ref, t):
        return ref[...] if prefetch else ref[tab_ref[t]]

    def body(t, carry):
        inside = (first + t) * page + lax.broadcasted_iota(jnp.int32, (1, page), 1) < length
        raw = page_of(k_ref, t)
        return _tile_step(carry, q, qr, raw, raw if kv_shared else page_of(v_ref, t), inside,
                          None if bias_ref is None else page_of(bias_ref, t),
                          None if pos_ref is None else page_of(pos_ref, t),
                          transform=transform, norm_row=norm_row, freq_row=freq_row, scale=scale)

    _write(o_ref, lse_ref, Ellipsis, lax.fori_loop(0, n_tiles, body, _empty(q.shape[0], dv)))


def flash_decode(q, k, v=None, bias=None, *, lengths=None, scale=None, key_transform: KeyTransform | None = None,
                 key_norm_scale=None, key_positions=None, pages: PagedKV | None = None, block_k=None, splits=None,
                 heads_per_block=None, prefetch=None, interpret=None):
    """q [B, 1, Hq, D]; k [B, S, Hkv, D] and v [B, S, Hkv, Dv] (v None: k is also the value); lengths [B, Hkv] int:
    the slots [0, length) each head holds and reads (None: all S); bias [B, S, Hkv] fp32 added to each logit
    (-inf: not readable by that head; None: nothing added); pages: a paged store each head also reads (None:
    none) -> [B, 1, Hq, Dv] in q's dtype. A head that can read no key returns 0.

    key_transform derives the scores' keys from k (and the pages) in the kernel (norm with key_norm_scale [D],
    RoPE at key_positions [B, S, Hkv] int and the pages' positions); values are always the cached arrays as
    stored. block_k, splits and heads_per_block override the target's choices, and prefetch (None: on a TPU) the
    way lengths and page tables reach the program (tests)."""
    tgt = platform.target()
    B, _, Hq, D = q.shape
    Hkv = k.shape[2]
    Dv = D if v is None else v.shape[-1]
    G = Hq // Hkv
    rows = max(MIN_ROWS[tgt], 1 << max(0, (G - 1).bit_length()) if tgt != "cpu" else G)
    tf = key_transform
    prefetch = tgt == "tpu" if prefetch is None else prefetch

    def per_head_rows(x_BHD):  # [B, Hkv * G, D] -> [B, Hkv, rows, D] in the cache dtype
        x = x_BHD.reshape(B, Hkv, G, D).astype(k.dtype)
        return jnp.pad(x, ((0, 0), (0, 0), (0, rows - G), (0, 0)))

    queries = [per_head_rows(q[:, 0])]
    if tf is not None and tf.rotates:
        q1, q2 = q[:, 0, :, :D // 2], q[:, 0, :, D // 2:]
        queries.append(per_head_rows(jnp.concatenate([-q2, q1], axis=-1)))
    shared = []  # whole [1, D] rows every program reads
    if tf is not None and tf.norm_eps is not None:
        shared.append(key_norm_scale.astype(jnp.float32).reshape(1, D))
    if tf is not None and tf.rotates:
        inv_freq = 1.0 / (tf.rope_theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
        shared.append(jnp.concatenate([inv_freq, inv_freq]).reshape(1, D))
    common = dict(tgt=tgt, queries=queries, shared=shared, tf=tf, rows=rows, dv=Dv, prefetch=prefetch,
                  scale=float(D) ** -0.5 if scale is None else float(scale), interpret=interpret)
    parts = [_dense_parts(k, v, bias, lengths, key_positions, block_k=block_k, splits=splits,
                          heads_per_block=heads_per_block, **common)]
    if pages is not None:
        parts.append(_paged_parts(pages, splits=splits, **common))
    o_parts, lse_parts = (jnp.concatenate(x, axis=2) for x in zip(*parts))
    # Combine the splits: weights exp(lse_c - max lse), all zero for a head that read nothing.
    m = jnp.max(lse_parts, axis=2, keepdims=True)
    w = jnp.exp(lse_parts - jnp.where(m == -jnp.inf, 0.0, m))
    total = jnp.sum(w, axis=2)
    o = jnp.sum(w * o_parts, axis=2) / jnp.where(total > 0, total, 1.0)
    return o[:, :, :G].reshape(B, 1, Hq, Dv).astype(q.dtype)


def _call(kernel, name, grid, specs, out_specs, inputs, *, out_dims, prefetched, tgt, interpret):
    """One pallas_call writing per-split partial outputs [B, Hkv, splits, rows, Dv] and log-sum-exps [..., 1]."""
    B, Hkv, n_split, rows, dv = out_dims
    out_shape = (jax.ShapeDtypeStruct((B, Hkv, n_split, rows, dv), jnp.float32),
                 jax.ShapeDtypeStruct((B, Hkv, n_split, rows, 1), jnp.float32))
    if prefetched:
        grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=len(prefetched), grid=grid, in_specs=specs,
                                                 out_specs=out_specs)
    else:
        grid_spec = pl.GridSpec(grid=grid, in_specs=specs, out_specs=out_specs)
    warps = DECODE_BLOCKS[tgt][2]
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid_spec=grid_spec, interpret=platform.resolve_interpret(interpret), name=name,
        compiler_params=platform.compiler_params(gpu=dict(num_warps=warps, num_stages=2),
                                                 tpu=dict(dimension_semantics=("parallel",) * 3,
                                                          vmem_limit_bytes=VMEM_LIMIT_BYTES)),
    )(*prefetched, *inputs)


def _dense_parts(k, v, bias, lengths, key_positions, *, tgt, queries, shared, tf, rows, dv, prefetch, scale,
                 interpret, block_k, splits, heads_per_block):
    """The dense cache's split partials (see `flash_decode`)."""
    pref_k, max_splits, _ = DECODE_BLOCKS[tgt]
    B, S, Hkv, D = k.shape
    bk = block_k or min(pref_k, max(8, 1 << max(0, (S - 1).bit_length())))
    n_tiles = -(-S // bk)
    n_split = splits or max(1, min(max_splits, n_tiles // 4))
    if tgt == "tpu":
        n_split = max(n_split, -(-S // TPU_SPLIT_KEYS))
    chunk = -(-n_tiles // n_split) * bk
    n_split = -(-S // chunk)
    # A TPU block's last dim must be a multiple of 128 lanes or the whole row: narrower heads share a block.
    hb = heads_per_block or (Hkv if tgt == "tpu" and (D % 128 or dv % 128) else 1)
    length_BH = jnp.full((B, Hkv), S, jnp.int32) if lengths is None else jnp.clip(lengths, 0, S).astype(jnp.int32)

    def per_key_rows(x_BSH, dtype):  # [B, S, Hkv] -> [B, Hkv, 1, S]
        return jnp.swapaxes(x_BSH.astype(dtype), 1, 2)[:, :, None, :]

    if prefetch:
        # The index maps get the prefetched lengths and per-block maxima after the grid indices; a split past
        # its block's longest head maps to the last split that holds anything (the same block: no new fetch).
        def held(c, blk_max_ref, b, h):
            return jnp.minimum(c, jnp.maximum(lax.div(blk_max_ref[b, h] + chunk - 1, chunk) - 1, 0))

        def spec(shape, index):
            return pl.BlockSpec(shape, lambda b, h, c, len_ref, blk_ref: index(b, h, c, held(c, blk_ref, b, h)))
    else:
        def spec(shape, index):
            return pl.BlockSpec(shape, lambda b, h, c: index(b, h, c, c))

    q_spec = spec((None, hb, rows, D), lambda b, h, c, ch: (b, h, 0, 0))
    key_row_spec = spec((None, hb, 1, chunk), lambda b, h, c, ch: (b, h, 0, ch))
    inputs, specs = list(queries), [q_spec] * len(queries)
    inputs.append(k.reshape(B, S, Hkv * D))
    specs.append(spec((None, chunk, hb * D), lambda b, h, c, ch: (b, ch, h)))
    if v is not None:
        inputs.append(v.reshape(B, S, Hkv * dv))
        specs.append(spec((None, chunk, hb * dv), lambda b, h, c, ch: (b, ch, h)))
    if bias is not None:
        inputs.append(per_key_rows(bias, jnp.float32))
        specs.append(key_row_spec)
    if not prefetch:
        inputs.append(length_BH.reshape(B, Hkv // hb, hb))
        specs.append(spec((None, None, hb), lambda b, h, c, ch: (b, h, 0)))
    inputs += shared
    specs += [spec((1, D), lambda b, h, c, ch: (0, 0))] * len(shared)
    if tf is not None and tf.rotates:
        inputs.append(per_key_rows(key_positions, jnp.int32))
        specs.append(key_row_spec)
    out_specs = (spec((None, hb, None, rows, dv), lambda b, h, c, ch: (b, h, c, 0, 0)),
                 spec((None, hb, None, rows, 1), lambda b, h, c, ch: (b, h, c, 0, 0)))
    kernel = functools.partial(_decode_kernel, kv_shared=v is None, transform=tf, has_bias=bias is not None,
                               prefetch=prefetch, block_k=bk, chunk=chunk, scale=scale, heads=hb, d=D, dv=dv)
    prefetched = (length_BH, length_BH.reshape(B, Hkv // hb, hb).max(axis=-1)) if prefetch else ()
    return _call(kernel, "flash_decode", (B, Hkv // hb, n_split), specs, out_specs, inputs,
                 out_dims=(B, Hkv, n_split, rows, dv), prefetched=prefetched, tgt=tgt, interpret=interpret)


def _paged_parts(pages: PagedKV, *, tgt, queries, shared, tf, rows, dv, prefetch, scale, interpret, splits):
    """A paged store's split partials (see `flash_decode`): a split is `per` consecutive entries of each pair's
    page list (one page on a TPU), the table padded to whole splits."""
    P, page, D = pages.k.shape
    B, Hkv, n = pages.table.shape
    if prefetch:
        per, n_split = 1, n
    else:
        n_split = splits or max(1, min(DECODE_BLOCKS[tgt][1], n // 4))
        per = 1 << max(0, (-(-n // n_split) - 1).bit_length())  # a power of two: Triton's table row
        n_split = -(-n // per)
    table = jnp.pad(jnp.clip(pages.table, 0, P - 1).astype(jnp.int32), ((0, 0), (0, 0), (0, n_split * per - n)))
    length_BH = jnp.clip(pages.lengths, 0, n * page).astype(jnp.int32)
    rows_of = lambda x, dtype: x.astype(dtype).reshape(P, 1, page)  # noqa: E731  [P, page] -> [P, 1, page]

    if prefetch:
        def page_index(b, h, c, tab_ref, len_ref):  # past the pair's last held page: that page again, no fetch
            last = jnp.maximum(lax.div(len_ref[b, h] + page - 1, page) - 1, 0)
            return tab_ref[b, h, jnp.minimum(c, last)]

        def pool_spec(shape):
            return pl.BlockSpec((None, *shape), lambda b, h, c, t, ln: (page_index(b, h, c, t, ln), 0, 0))

        def spec(shape, index):
            return pl.BlockSpec(shape, lambda b, h, c, t, ln: index(b, h, c))
    else:
        def pool_spec(shape):
            return pl.BlockSpec((P, *shape), lambda b, h, c: (0, 0, 0))

        def spec(shape, index):
            return pl.BlockSpec(shape, index)

    inputs, specs = list(queries), [spec((None, None, rows, D), lambda b, h, c: (b, h, 0, 0))] * len(queries)
    inputs.append(pages.k)
    specs.append(pool_spec((page, D)))
    if pages.v is not None:
        inputs.append(pages.v)
        specs.append(pool_spec((page, dv)))
    if pages.bias is not None:
        inputs.append(rows_of(pages.bias, jnp.float32))
        specs.append(pool_spec((1, page)))
    if not prefetch:
        inputs += [length_BH.reshape(B, Hkv, 1), table]
        specs += [spec((None, None, 1), lambda b, h, c: (b, h, 0)), spec((None, None, per), lambda b, h, c: (b, h, c))]
    inputs += shared
    specs += [spec((1, D), lambda b, h, c: (0, 0))] * len(shared)
    if tf is not None and tf.rotates:
        inputs.append(rows_of(pages.positions, jnp.int32))
        specs.append(pool_spec((1, page)))
    out_specs = (spec((None, None, None, rows, dv), lambda b, h, c: (b, h, c, 0, 0)),
                 spec((None, None, None, rows, 1), lambda b, h, c: (b, h, c, 0, 0)))
    kernel = functools.partial(_paged_kernel, kv_shared=pages.v is None, transform=tf,
                               has_bias=pages.bias is not None, prefetch=prefetch, page=page, per_split=per,
                               scale=scale, dv=dv)
    return _call(kernel, "flash_decode_paged", (B, Hkv, n_split), specs, out_specs, inputs,
                 out_dims=(B, Hkv, n_split, rows, dv), prefetched=(table, length_BH) if prefetch else (), tgt=tgt,
                 interpret=interpret)
