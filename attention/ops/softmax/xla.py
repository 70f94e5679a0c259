"""Blocked online softmax in jnp (flash-attention style) that skips fully masked tiles, with a recomputing
custom VJP; and the decode read of a KV cache in the cache's own dtype.

Under SP-KV (a key gate with a local window, causal) the keys come from two sources that share one online
softmax: the dense keys within the local window (a band, never gated) and the compact keys the gate keeps,
gathered with their positions (`kernels_pallas.flash.compact`), so the far part costs what the gate keeps."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from attention.ops import dispatch
from attention.ops.softmax.api import documents, matmul_precision, resolve_scale, transform_keys
from kernels_pallas.flash import compact

# (block_q, block_k) of the xla implementation. CPU: measured on 2 cores at B=8, Hq=8, D=64, fp32,
# causal, T=512 and 2048; 64x64 beat 32x64, 64x32, 128x64, 64x128, 128x128 and 256-wide tiles.
# Probably because a tile holds all B*H heads: its fp32 score block, B*H*64*64*4 bytes = 1 MiB, stays
# in a core's L2, while narrower tiles make the matmuls too small. GPU and TPU entries are unmeasured
# starting points.
BLOCK_SIZES = {"cpu": (64, 64), "gpu": (128, 128), "tpu": (512, 512)}


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one key source of a blocked call: lengths, tiles, masks.

    compact: the keys are SP-KV's compact keys (they carry their positions; a query sees one only at distance
    >= local_window, with the gate added); otherwise local_window says where the gate applies (t - s >=
    local_window; None: everywhere)."""

    t: int
    s: int
    block_q: int
    block_k: int
    causal: bool
    sliding_window: int | None
    local_window: int | None
    scale: float
    compact: bool = False

    @property
    def offset(self) -> int:
        return self.s - self.t

    @property
    def num_q_blocks(self) -> int:
        return -(-self.t // self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return -(-self.s // self.block_k)

    def query_span(self, i):
        """Positions (first, last) of the real queries of query block i (ints or tracers)."""
        return self.offset + i * self.block_q, self.offset + jnp.minimum((i + 1) * self.block_q, self.t) - 1

    def kv_block_range(self, i):
        """[lo, hi) of the kv blocks that causal/window masks leave visible to query block i (an int or
        a tracer)."""
        first, last = self.query_span(i)
        key_hi = jnp.minimum(self.s, last + 1) if self.causal else self.s
        key_lo = jnp.maximum(0, first - self.sliding_window + 1) if self.sliding_window else 0
        lo = key_lo // self.block_k
        return lo, jnp.where(key_hi > key_lo, -(-key_hi // self.block_k), lo)


@dispatch.register("softmax_attention", "xla")
def softmax_attention_xla(q, k, v, *, causal=True, sliding_window=None, local_window=None,
                          key_log_gate=None, segment_ids=None, scale=None, block_q=None, block_k=None):
    """Flash-style attention: per query block, a loop over only the kv blocks some mask leaves visible; under
    SP-KV, over the local window's dense blocks and the compact blocks of kept keys that the block can see.

    block_q / block_k override BLOCK_SIZES (tests use small tiles to exercise several of them).
    """
    return _blocked_attention(*_key_sources(q, k, v, causal=causal, sliding_window=sliding_window,
                                            local_window=local_window, key_log_gate=key_log_gate, scale=scale,
                                            block_q=block_q, block_k=block_k), q, segment_ids)


def _key_sources(q, k, v, *, causal, sliding_window, local_window, key_log_gate, scale, block_q, block_k):
    """(plans, sources, positions) of a call: one dense source, or under SP-KV the local window's band (when
    local_window > 0) and the compact keys."""
    T, D, S = q.shape[1], q.shape[3], k.shape[1]
    default_q, default_k = BLOCK_SIZES.get(dispatch.backend(), BLOCK_SIZES["gpu"])
    plan = _Plan(t=T, s=S, block_q=min(block_q or default_q, T), block_k=min(block_k or default_k, S),
                 causal=causal, sliding_window=sliding_window,
                 local_window=local_window if key_log_gate is not None else None,
                 scale=resolve_scale(scale, D))
    if key_log_gate is None or local_window is None or not causal:
        return (plan,), ((k, v, key_log_gate),), (None,)
    index, position, _ = compact.kept_order(key_log_gate)
    k_far = compact.gather(k, index, position)
    far = (k_far, k_far if v is k else compact.gather(v, index, position),
           compact.gather(key_log_gate, index, position))
    plans, sources, positions = (dataclasses.replace(plan, compact=True),), (far,), (position,)
    if local_window > 0:
        band = min(local_window, sliding_window or local_window)
        plans = (dataclasses.replace(plan, sliding_window=band, local_window=None),) + plans
        sources, positions = ((k, v, None),) + sources, (None,) + positions
    return plans, sources, positions


def tiles_computed(q, k, v, *, causal=True, sliding_window=None, local_window=None, key_log_gate=None,
                   segment_ids=None, scale=None, block_q=None, block_k=None):
    """(tiles, tile shape (block_q, block_k)): how many (query block, key block) tiles the xla path computes
    for this call, forward (the backward visits the same ones). What its cost follows; benchmarks report it."""
    plans, sources, positions = _key_sources(q, k, v, causal=causal, sliding_window=sliding_window,
                                             local_window=local_window, key_log_gate=key_log_gate, scale=scale,
                                             block_q=block_q, block_k=block_k)
    total = 0
    for bl in _sources(plans, q, segment_ids, sources, positions):
        lo, hi = jax.vmap(bl.kv_bounds)(jnp.arange(plans[0].num_q_blocks))
        total = total + jnp.sum(hi - lo)
    return total, (plans[0].block_q, plans[0].block_k)


class _Blocked:
    """Block-major, padded copies of the inputs of one key source, and the work on one tile.

    Block-major ([num_blocks, B, Hkv, block, ...]) makes every per-tile slice and every accumulator
    update a contiguous copy; on XLA:CPU the strided tile copies of a [B,H,T,D] layout cost about as
    much as the tile's exp.
    q [nq,B,Hkv,bq,G,D] keeps the G query heads of a kv head together, so GQA reads each K/V tile once
    and never repeats it. k [nk,B,Hkv,bk,D], v [nk,B,Hkv,bk,Dv], gate [nk,B,Hkv,bk] fp32,
    q_doc [nq,B,bq] and k_doc [nk,B,bk] document indices. Compact keys also carry position [nk,B,Hkv,bk]
    (FAR past each head's count) and k_doc per head [nk,B,Hkv,bk].
    """

    def __init__(self, plan: _Plan, q, k, v, gate, seg, position=None):
        self.plan = plan
        self.hkv = k.shape[2]
        self.q = self.q_blocks(q)
        self.k = self.k_blocks(k)
        self.v = self.k_blocks(v)
        self.gate = None if gate is None else self.k_blocks(gate.astype(jnp.float32)[..., None])[..., 0]
        self.q_doc = self.k_doc = self.overlap = self.position = None
        if plan.compact:
            self.position = self.k_blocks(position[..., None], fill=compact.FAR)[..., 0]
            first, last = plan.query_span(jnp.arange(plan.num_q_blocks))
            lo, hi = compact.visible_slots(position, first, last, local_window=plan.local_window,
                                           sliding_window=plan.sliding_window)
            lo, hi = lo.min(axis=(0, 1)), hi.max(axis=(0, 1))
            self.bounds = (lo // plan.block_k, jnp.where(hi > lo, -(-hi // plan.block_k), lo // plan.block_k))
        if seg is not None:
            doc_BT = documents(seg)
            self.q_doc = _doc_blocks(doc_BT, plan.num_q_blocks, plan.block_q)
            if plan.compact:
                held = jnp.clip(position, 0, doc_BT.shape[1] - 1)
                self.k_doc = self.k_blocks(jnp.take_along_axis(doc_BT[:, :, None], held, axis=1)[..., None])[..., 0]
            else:
                self.k_doc = _doc_blocks(doc_BT, plan.num_k_blocks, plan.block_k)
                self.overlap = _document_overlap(self.q_doc, self.k_doc)

    def q_blocks(self, x_BTHD, *, transposed=False):
        """[B,T,Hq,X] -> [nq,B,Hkv,bq,G,X], or [nq,B,Hkv,X,bq,G] when transposed."""
        p = self.plan
        B, T, Hq, X = x_BTHD.shape
        x = jnp.pad(x_BTHD, ((0, 0), (0, p.num_q_blocks * p.block_q - T), (0, 0), (0, 0)))
        x = x.reshape(B, p.num_q_blocks, p.block_q, self.hkv, Hq // self.hkv, X)
        return x.transpose((1, 0, 3, 5, 2, 4) if transposed else (1, 0, 3, 2, 4, 5))

    def k_blocks(self, x_BSHD, fill=0):
        """[B,S,Hkv,X] -> [nk,B,Hkv,bk,X], padded with fill."""
        p = self.plan
        B, S, H, X = x_BSHD.shape
        x = jnp.pad(x_BSHD, ((0, 0), (0, p.num_k_blocks * p.block_k - S), (0, 0), (0, 0)), constant_values=fill)
        return x.reshape(B, p.num_k_blocks, p.block_k, H, X).transpose(1, 0, 3, 2, 4)

    def kv_bounds(self, i):
        """Loop bounds over kv blocks for query block i: causal/window range (compact keys: the slots some
        query of the block can see), narrowed to shared documents."""
        if self.plan.compact:
            return self.bounds[0][i], self.bounds[1][i]
        lo, hi = self.plan.kv_block_range(i)
        if self.overlap is None:
            return lo, hi
        j = jnp.arange(self.plan.num_k_blocks)
        hit = self.overlap[i] & (j >= lo) & (j < hi)
        first = jnp.argmax(hit)
        last = self.plan.num_k_blocks - jnp.argmax(hit[::-1])
        return jnp.where(hit.any(), first, lo), jnp.where(hit.any(), last, lo)

    def tile(self, q_blk, i, j):
        """Masked fp32 logits [B,H,bq,G,bk] of tile (i, j), where the gate applied ([bq,1,bk] or None: every
        visible pair), and the k and v blocks."""
        p = self.plan
        k_blk, v_blk = self.k[j], self.v[j]
        s_BHQGK = _dot("bhqgd,bhkd->bhqgk", q_blk, k_blk) * p.scale
        q_pos = p.offset + i * p.block_q + lax.broadcasted_iota(jnp.int32, (p.block_q, 1, 1), 0)
        if p.compact:
            k_pos = self.position[j][:, :, None, None, :]
        else:
            k_pos = j * p.block_k + lax.broadcasted_iota(jnp.int32, (1, 1, p.block_k), 2)
        rel = q_pos - k_pos

        gated = None
        if self.gate is not None:
            gate_BH11K = self.gate[j][:, :, None, None, :]
            if p.local_window is None or p.compact:
                s_BHQGK = s_BHQGK + gate_BH11K
            else:
                gated = rel >= p.local_window
                s_BHQGK = s_BHQGK + jnp.where(gated, gate_BH11K, 0.0)

        visible = []
        if p.compact:
            # Empty slots sit at FAR, past every query.
            visible.append(rel >= p.local_window)
        elif p.s % p.block_k:
            visible.append(k_pos < p.s)
        if p.causal and not p.compact:
            visible.append(rel >= 0)
        if p.sliding_window is not None:
            visible.append(rel < p.sliding_window)
        if self.q_doc is not None:
            k_doc = self.k_doc[j] if p.compact else self.k_doc[j][:, None, :]
            same_doc = self.q_doc[i][:, None, :, None, None] == k_doc[:, :, None, None, :]
            visible.append(same_doc)
        if visible:
            s_BHQGK = jnp.where(functools.reduce(jnp.logical_and, visible), s_BHQGK, -jnp.inf)
        return s_BHQGK, gated, k_blk, v_blk


def _doc_blocks(doc_BT, num_blocks, block):
    """[B,T] -> [num_blocks,B,block]. Edge padding keeps a block's document range as tight as its real
    rows, for the loop bounds."""
    B, T = doc_BT.shape
    doc = jnp.pad(doc_BT, ((0, 0), (0, num_blocks * block - T)), mode="edge")
    return doc.reshape(B, num_blocks, block).transpose(1, 0, 2)


def _document_overlap(q_doc_NBQ, k_doc_NBK):
    """[nq, nk] bool: does some query of block i share a document with some key of block j (any batch row).

    Document indices are sorted along time, so overlapping index ranges mean a shared document.
    """
    q_min, q_max = q_doc_NBQ.min(-1).T[:, :, None], q_doc_NBQ.max(-1).T[:, :, None]
    k_min, k_max = k_doc_NBK.min(-1).T[:, None, :], k_doc_NBK.max(-1).T[:, None, :]
    return jnp.any((q_min <= k_max) & (k_min <= q_max), axis=0)


def _dot(spec, a, b):
    """fp32-accumulating einsum; fp32 operands get full-precision products on every backend."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=matmul_precision(a.dtype))


def _sources(plans, q, seg, sources, positions):
    return [_Blocked(p, q, k, v, g, seg, pos) for p, (k, v, g), pos in zip(plans, sources, positions)]


def _forward(plans, q, seg, sources, positions):
    B, T, Hq, _ = q.shape
    Dv = sources[0][1].shape[-1]
    blocked = _sources(plans, q, seg, sources, positions)
    row_shape = blocked[0].q.shape[1:5]

    def query_block(_, xs):
        i, q_blk = xs

        def kv_block(bl, j, carry):
            m_BHQG, l_BHQG, acc_BHQGD = carry
            s_BHQGK, _, _, v_blk = bl.tile(q_blk, i, j)
            m_new = jnp.maximum(m_BHQG, s_BHQGK.max(-1))
            # Rows that have seen no visible key yet keep max -inf; shift them by 0 so exp stays exp(-inf).
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p_BHQGK = jnp.exp(s_BHQGK - m_safe[..., None])
            alpha = jnp.exp(m_BHQG - m_safe)
            pv_BHQGD = _dot("bhqgk,bhkd->bhqgd", p_BHQGK.astype(v_blk.dtype), v_blk)
            return m_new, alpha * l_BHQG + p_BHQGK.sum(-1), alpha[..., None] * acc_BHQGD + pv_BHQGD

        carry = (jnp.full(row_shape, -jnp.inf, jnp.float32), jnp.zeros(row_shape, jnp.float32),
                 jnp.zeros(row_shape + (Dv,), jnp.float32))
        for bl in blocked:
            carry = lax.fori_loop(*bl.kv_bounds(i), functools.partial(kv_block, bl), carry)
        m_BHQG, l_BHQG, acc_BHQGD = carry
        seen = l_BHQG > 0
        l_safe = jnp.where(seen, l_BHQG, 1.0)
        # +inf for empty rows makes the backward's exp(s - lse) exactly 0 there instead of NaN.
        lse_BHQG = jnp.where(seen, m_BHQG + jnp.log(l_safe), jnp.inf)
        return None, ((acc_BHQGD / l_safe[..., None]).astype(q.dtype), lse_BHQG)

    _, (o_NBHQGD, lse_NBHQG) = lax.scan(query_block, None, (jnp.arange(plans[0].num_q_blocks), blocked[0].q))
    o = o_NBHQGD.transpose(1, 0, 3, 2, 4, 5).reshape(B, -1, Hq, Dv)[:, :T]
    return o, lse_NBHQG


def _backward(plans, q, seg, sources, positions, o, lse_NBHQG, do):
    B, T, Hq, D = q.shape
    f32 = jnp.float32
    blocked = _sources(plans, q, seg, sources, positions)
    first = blocked[0]
    # Padded query rows get a zero cotangent, so their tiles add nothing to dk, dv or the gate.
    do_NBHQGD = first.q_blocks(do)
    delta_NBHQG = first.q_blocks(jnp.sum(o.astype(f32) * do.astype(f32), axis=-1, keepdims=True))[..., 0]
    # q and do are also blocked transposed ([.., D, bq, G]) and dk, dv accumulate transposed
    # ([.., D, bk]): every product in the loop then contracts a contiguous axis, with no tile-sized transpose.
    qT_NBHDQG = first.q_blocks(q, transposed=True)
    doT_NBHDQG = first.q_blocks(do, transposed=True)

    def query_block(accs, xs):
        i, q_blk, qT_blk, do_blk, doT_blk, lse_BHQG, delta_BHQG = xs
        lse_blk, delta_blk = lse_BHQG[..., None], delta_BHQG[..., None]

        def kv_block(bl, j, carry):
            dq_BHQGD, dkT_NBHDK, dvT_NBHDK, dgate_NBHK = carry
            s_BHQGK, gated, k_blk, v_blk = bl.tile(q_blk, i, j)
            p_BHQGK = jnp.exp(s_BHQGK - lse_blk)
            dp_BHQGK = _dot("bhqgd,bhkd->bhqgk", do_blk, v_blk)
            ds_BHQGK = p_BHQGK * (dp_BHQGK - delta_blk)
            ds_in = ds_BHQGK.astype(k_blk.dtype)
            dq_BHQGD = dq_BHQGD + _dot("bhqgk,bhkd->bhqgd", ds_in, k_blk)
            dkT_NBHDK = dkT_NBHDK.at[j].add(_dot("bhdqg,bhqgk->bhdk", qT_blk, ds_in))
            dvT_NBHDK = dvT_NBHDK.at[j].add(_dot("bhdqg,bhqgk->bhdk", doT_blk, p_BHQGK.astype(v_blk.dtype)))
            if dgate_NBHK is not None:
                gated_ds = ds_BHQGK if gated is None else jnp.where(gated, ds_BHQGK, 0.0)
                dgate_NBHK = dgate_NBHK.at[j].add(gated_ds.sum((2, 3)))
            return dq_BHQGD, dkT_NBHDK, dvT_NBHDK, dgate_NBHK

        dq_BHQGD = jnp.zeros(q_blk.shape[:4] + (D,), f32)
        new_accs = []
        for bl, acc in zip(blocked, accs):
            dq_BHQGD, *acc = lax.fori_loop(*bl.kv_bounds(i), functools.partial(kv_block, bl), (dq_BHQGD, *acc))
            new_accs.append(tuple(acc))
        return tuple(new_accs), dq_BHQGD

    def zeros(plan, k, v, gate):
        nk, Hkv = plan.num_k_blocks, k.shape[2]
        return (jnp.zeros((nk, B, Hkv, D, plan.block_k), f32), jnp.zeros((nk, B, Hkv, v.shape[-1], plan.block_k), f32),
                None if gate is None else jnp.zeros((nk, B, Hkv, plan.block_k), f32))

    accs = tuple(zeros(p, *src) for p, src in zip(plans, sources))
    xs = (jnp.arange(plans[0].num_q_blocks), first.q, qT_NBHDQG, do_NBHQGD, doT_NBHDQG, lse_NBHQG, delta_NBHQG)
    accs, dq_NBHQGD = lax.scan(query_block, accs, xs)

    scale = plans[0].scale
    dq = (dq_NBHQGD * scale).transpose(1, 0, 3, 2, 4, 5).reshape(B, -1, Hq, D)[:, :T]
    grads = []
    for (k, v, gate), (dkT_NBHDK, dvT_NBHDK, dgate_NBHK) in zip(sources, accs):
        S, Hkv = k.shape[1], k.shape[2]
        dk = (dkT_NBHDK * scale).transpose(1, 0, 4, 2, 3).reshape(B, -1, Hkv, D)[:, :S]
        dv = dvT_NBHDK.transpose(1, 0, 4, 2, 3).reshape(B, -1, Hkv, v.shape[-1])[:, :S]
        dgate = None
        if gate is not None:
            dgate = dgate_NBHK.transpose(1, 0, 3, 2).reshape(B, -1, Hkv)[:, :S].astype(gate.dtype)
        grads.append((dk.astype(k.dtype), dv.astype(v.dtype), dgate))
    return dq.astype(q.dtype), tuple(grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked_attention(plans, sources, positions, q, seg):
    """Attention of q to the union of the key sources ((k, v, gate or None) each, one _Plan each; compact
    sources with their key positions, None for the others), as one online softmax."""
    return _forward(plans, q, seg, sources, positions)[0]


def _blocked_attention_fwd(plans, sources, positions, q, seg):
    o, lse = _forward(plans, q, seg, sources, positions)
    return o, (q, seg, sources, positions, o, lse)


def _blocked_attention_bwd(plans, res, do):
    q, seg, sources, positions, o, lse = res
    dq, grads = _backward(plans, q, seg, sources, positions, o, lse, do)
    return grads, None, dq, None


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


# Key block of the decode read: the loop runs over ceil(longest held length / block) blocks. CPU: 512, measured
# at S = 32k (B 1, 32/8 heads, d 128, fp32) beside 256 and 1024; GPU and TPU entries are unmeasured starting points.
DECODE_BLOCK = {"cpu": 512, "gpu": 1024, "tpu": 1024}


# How the decode contracts a block: "sum" (broadcast multiplies and sums) on the CPU, where XLA fuses them into one
# pass over the block while its dots first transpose the block to head-major (slower, measured at S = 32k,
# B 1, 32/8 heads, d 128, fp32: 3-4x); "dot" elsewhere (tensor cores, MXU).
DECODE_CONTRACTION = {"cpu": "sum", "gpu": "dot", "tpu": "dot"}


def _decode_contractions(kind: str):
    """(scores, weighted): q [B,H,G,D] . k block [B,K,H,D] -> [B,K,H,G] and p [B,K,H,G] . v block [B,K,H,D] ->
    [B,H,G,D], fp32, as `kind` ("sum" or "dot") computes them."""
    f32 = jnp.float32
    if kind == "sum":
        return (lambda q, k: jnp.sum(k.astype(f32)[:, :, :, None, :] * q.astype(f32)[:, None], axis=-1),
                lambda p, v: jnp.sum(p[..., None] * v.astype(f32)[:, :, :, None, :], axis=1))
    return (lambda q, k: _dot("bhgd,bkhd->bkhg", q.astype(k.dtype), k),
            lambda p, v: _dot("bkhg,bkhd->bhgd", p.astype(v.dtype), v))


@dispatch.register("softmax_decode", "xla")
def softmax_decode_xla(q, k, v, valid=None, *, lengths=None, key_log_gate=None, scale=None, key_norm_scale=None,
                       key_norm_eps=1e-5, key_rope_theta=None, key_positions=None, pages=None, block_k=None,
                       contraction=None):
    """An online softmax over key blocks, read in the cache's own dtype with fp32 accumulation, for as many
    blocks as the longest held length of the batch (a dynamic loop bound: a pruned or part-filled cache costs
    what it holds); shorter heads mask the rest of it. A paged store follows in the same softmax, its pages
    gathered through the page table a block of pages at a time, for as many blocks as the pair holding the most
    pages needs. Derived keys (norm, RoPE) are made per block, so a K=V cache is read once. block_k and
    contraction override the backend's choices (tests)."""
    B, _, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    Dv, G = v.shape[-1], Hq // Hkv
    f32 = jnp.float32
    backend = dispatch.backend()
    block = block_k or DECODE_BLOCK[backend]
    bk = min(block, S)
    scores, weighted = _decode_contractions(contraction or DECODE_CONTRACTION[backend])
    length_BH = jnp.full((B, Hkv), S, jnp.int32) if lengths is None else jnp.clip(lengths, 0, S).astype(jnp.int32)
    q_BHGD = q[:, 0].reshape(B, Hkv, G, D) * resolve_scale(scale, D)
    derive = key_norm_scale is not None or key_rope_theta is not None

    def read(carry, k_BKHD, v_BKHD, ok_BKH, gate_BKH, pos_BKH):
        """One block of keys into the online softmax; slots a head may not read (ok False) can hold anything."""
        m_BHG, l_BHG, acc_BHGD = carry
        if derive:
            k_BKHD = transform_keys(k_BKHD, key_norm_scale=key_norm_scale, key_norm_eps=key_norm_eps,
                                    key_rope_theta=key_rope_theta, key_positions=pos_BKH).astype(k.dtype)
        s_BKHG = scores(q_BHGD, k_BKHD)
        if gate_BKH is not None:
            s_BKHG = s_BKHG + gate_BKH.astype(f32)[..., None]
        s_BKHG = jnp.where(ok_BKH[..., None], s_BKHG, -jnp.inf)
        m_new = jnp.maximum(m_BHG, s_BKHG.max(1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p_BKHG = jnp.exp(s_BKHG - m_safe[:, None])
        alpha = jnp.exp(m_BHG - m_safe)
        # Zeroed, not just weighted 0: 0 x NaN is NaN.
        v_BKHD = jnp.where(ok_BKH[..., None], v_BKHD, 0)
        acc_BHGD = acc_BHGD * alpha[..., None] + weighted(p_BKHG, v_BKHD)
        return m_new, l_BHG * alpha + p_BKHG.sum(1), acc_BHGD

    def dense_block(j, carry):
        # The last block is shifted back to end at S (no padded copy of the cache); the slots it shares with
        # the block before are masked as already read.
        start = jnp.minimum(j * bk, S - bk)
        take = functools.partial(lax.dynamic_slice_in_dim, start_index=start, slice_size=bk, axis=1)
        slot_K = start + jnp.arange(bk)
        ok_BKH = (slot_K >= j * bk)[None, :, None] & (slot_K[None, :, None] < length_BH[:, None, :])
        if valid is not None:
            ok_BKH &= take(valid)
        k_BKHD = take(k)
        return read(carry, k_BKHD, k_BKHD if v is k else take(v), ok_BKH,
                    None if key_log_gate is None else take(key_log_gate),
                    None if key_positions is None else take(key_positions))

    carry = (jnp.full((B, Hkv, G), -jnp.inf, f32), jnp.zeros((B, Hkv, G), f32), jnp.zeros((B, Hkv, G, Dv), f32))
    carry = lax.fori_loop(0, (jnp.max(length_BH) + bk - 1) // bk, dense_block, carry)
    if pages is not None:
        carry = _read_pages(pages, read, carry, block, derive and key_rope_theta is not None)
    _, l_BHG, acc_BHGD = carry
    o_BHGD = acc_BHGD / jnp.where(l_BHG > 0, l_BHG, 1.0)[..., None]
    return o_BHGD.reshape(B, 1, Hq, Dv).astype(q.dtype)


def _read_pages(pages, read, carry, block: int, rotates: bool):
    """`read` over a paged store (`KeyPages`), a block of about `block` keys (whole pages) at a time: each
    pair's pages gathered through its table row, slots past its length masked."""
    P, page = pages.k.shape[:2]
    B, Hkv, n = pages.table.shape
    per = max(1, min(block // page, n))
    table = jnp.pad(jnp.clip(pages.table, 0, P - 1), ((0, 0), (0, 0), (0, -n % per)))
    held_BH = jnp.clip(pages.lengths, 0, n * page).astype(jnp.int32)

    def page_block(j, carry):
        ids_BHn = lax.dynamic_slice_in_dim(table, j * per, per, axis=2)

        def gather(x):  # [P, page, ...] -> [B, per * page, Hkv, ...]
            x = jnp.moveaxis(x[ids_BHn], 1, 3)
            return x.reshape(B, per * page, Hkv, *x.shape[4:])

        slot_K = j * per * page + jnp.arange(per * page)
        k_BKHD = gather(pages.k)
        return read(carry, k_BKHD, k_BKHD if pages.v is pages.k else gather(pages.v),
                    slot_K[None, :, None] < held_BH[:, None, :],
                    None if pages.key_log_gate is None else gather(pages.key_log_gate),
                    gather(pages.positions) if rotates else None)

    n_blocks = (jnp.max(held_BH) + per * page - 1) // (per * page)
    return lax.fori_loop(0, n_blocks, page_block, carry)
