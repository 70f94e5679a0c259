"""The `softmax` mixer: multi-head attention with MHA/GQA/MQA (`n_kv_heads`) over `ops.softmax_attention`.

Projection sharing (`share`, from "Do Transformers Need Three Projections?"):

- `none`: separate q_proj, k_proj, v_proj (the QKV baseline).
- `kv` (Q−K=V): k_proj's output is both key and value; there is no v_proj. With n_kv_heads < n_heads
  the shared K has n_kv_heads heads (the paper's Q-GQA / Q-MQA). Only K is cached: half the cache.
- `qk` (Q=K−V): k_proj's output is also the query (no q_proj), so the scores K·Kᵀ are symmetric;
  v_proj stays. The query needs n_heads heads, so this requires n_kv_heads == n_heads: repeating a
  shared key head as several query heads would only make those heads identical. The paper ran it
  with MHA only.
- `qkv` (Q=K=V): k_proj alone gives query, key and value (same n_kv_heads == n_heads rule).

Sharing is tensor reuse: the shared projection is one array, passed as both k and v to the op (which
supports `v is k`) whenever nothing position-dependent touches the logit side. The paper's models use
learned absolute positions, where that is the whole story. With RoPE (or qk_norm), the value is the
un-rotated, un-normed shared projection and the scores use a rotated (normed) copy of it, so values
never depend on position; decoding therefore caches the un-rotated projection and asks the decode op to
derive the keys from it (norm, then RoPE at each slot's position). The Pallas decode kernel does that per
tile while it reads the cache, so one read serves as key and value; the xla path writes a transformed copy.

`pos2d` (the "(X)+" variants, share qk|qkv): a fixed map P[i,j] = concat(sincos(i) in m//2 channels,
sincos(j) in m - m//2) mixed into the scaled scores by learned per-layer weights w [m], shared across
heads: S' = S·Σw + Σ_c w_c·P[i,j,c] + b. Because P splits into a query-row half and a key-column half,
the row half and b add the same amount to every score of a query row and cancel in the softmax. What
remains is S·Σw plus a per-key bias Σ_{c>=m//2} w_c·sincos_c(j), so the term runs through the blocked op
(Σw folded into the query, the key bias as `key_log_gate`, shifted by Σ|w_c| to keep it <= 0 as the op
requires; a constant shift also cancels). Memory stays O(T), and decode adds the same bias to the
cached keys. b would receive no gradient, so it is not a parameter. The row weights still act through Σw.

`spkv` (Self-Pruned KV, attention/spkv.py): a utility predictor on the mixer's input gates every key outside
a local window; decode keeps a pruned cache. Its gate and pos2d's bias are the same kind of term, one per-key
addition to the logits, so `_key_log_gate` supplies either. They cannot be combined: the op spares one
window (pos2d's bias reaches every key) and takes one term. A sliding window already drops old keys, so it
excludes spkv too.

`value_shift` (a control for CCA, from its paper's eq. 10): the second half of the value channels (kv heads
n_kv/2.. for an even n_kv, else the split falls inside a head) is the previous token's projection, with its own
weights: those columns of v_proj applied to x[t-1], i.e. the projection shifted down one row. Half the value
heads then see only the previous token; parameters and FLOPs stay those of one value projection. A document's
first token reads the projection of a zero row (the bias, if any); decode keeps the previous token's half row.

`local_heads` (a per-head hybrid, what `attnlab design-hybrid --per-head` writes, after SP-KV's "Strategy D"):
the listed KV heads and the query heads that read them attend within `sliding_window`, the other heads to the
whole context. The layer's heads split into a global and a local group, each one call of the op (and, in decode,
one cache: the local group's a ring of the window), the outputs put back in head order; so the cache holds
exactly what the analytic counts say.

Decode caches: a dense one (a ring of the window with sliding_window), read up to the current position; or a
pruned one (attention/pruned_cache.py) under a cache policy (attention/cache_policies.py): SP-KV's on an SP-KV
layer, or a baseline at a budget of keys (`init_cache(..., policy=...)`), read up to each head's held length.
"""
from __future__ import annotations

from typing import Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pydantic
from flax import nnx
from pydantic import Field

from attention import ops
from attention.base import MixerConfig, MixerContext, visible_keys_per_query
from attention import cache_policies, pruned_cache, spkv
from attention.cache_policies import CachePolicy, CachePolicyError
from attention.spkv import SPKVConfig, SPKVGate
from attention.layers import (Linear, RMSNorm, apply_rope, causal_conv, delay, normal, param,
                              positions_from_segments)

# The paper's init for the 2D-position mixing weights, independent of model.init_std.
POS2D_INIT_STD = 0.02


class Pos2dConfig(pydantic.BaseModel):
    """The fixed 2D sin/cos score term of the symmetric (Q=K) variants."""

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = False
    channels: int = Field(10, ge=2)  # m: m//2 sin/cos channels of the query position, the rest of the key's


class SoftmaxConfig(MixerConfig):
    kind: Literal["softmax"] = "softmax"
    n_heads: int = 8
    n_kv_heads: Optional[int] = Field(None, ge=1)  # None: n_heads (MHA); 1: MQA; otherwise GQA
    head_dim: Optional[int] = Field(None, ge=1)  # None: d_model // n_heads
    pos: Optional[Literal["rope", "none"]] = None  # None: rope when the model uses rope, else none (NoPE layers)
    qk_norm: bool = False
    sliding_window: Optional[int] = None
    # The KV heads that attend within sliding_window (the rest read the whole context); None: every head.
    local_heads: Optional[list[int]] = None
    scale: Optional[float] = Field(None, gt=0)  # None: head_dim ** -0.5
    share: Literal["none", "kv", "qk", "qkv"] = "none"
    pos2d: Pos2dConfig = Field(default_factory=Pos2dConfig)
    spkv: Optional[SPKVConfig] = None  # None: every key stays in the cache
    # A control for the convolutional variants (KDA, CCA): the depthwise causal short conv of width W and SiLU
    # that KDA puts on its q, k and v projections, here on softmax attention's. None: off.
    short_conv: Optional[int] = Field(None, ge=2)
    short_conv_init: Literal["uniform", "normal"] = "uniform"  # as KDAConfig.conv_init
    # A control for CCA: its value shift (half the value channels from the previous token) on softmax attention.
    value_shift: bool = False

    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def query_is_key(self) -> bool:
        return self.share in ("qk", "qkv")

    def value_is_key(self) -> bool:
        return self.share in ("kv", "qkv")

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
        if self.local_heads is not None:
            if self.sliding_window is None:
                errs.append("local_heads: names the KV heads that attend within sliding_window, which is not set; "
                            "set sliding_window or local_heads: null")
            bad = [h for h in self.local_heads if not 0 <= h < self.kv_heads()]
            if not self.local_heads or bad or len(set(self.local_heads)) != len(self.local_heads):
                errs.append(f"local_heads: must list distinct KV heads in [0, {self.kv_heads()}), at least one; got "
                            f"{self.local_heads} (null: every head attends within sliding_window)")
        if self.pos == "rope" and ctx.pos == "learned":
            errs.append("pos: rope inside a mixer of a model with learned positions is not supported")
        if self.query_is_key() and self.kv_heads() != self.n_heads:
            errs.append(f"share: {self.share} makes the key projection the query, so it needs n_kv_heads == n_heads "
                        f"({self.n_heads}), got n_kv_heads {self.kv_heads()}; for grouped K=V use share: kv")
        if self.pos2d.enabled and not self.query_is_key():
            errs.append(f"pos2d.enabled: the 2D positional term is for the symmetric variants (share: qk or qkv), "
                        f"got share: {self.share}; set share or pos2d.enabled: false")
        if self.short_conv is not None and (self.share != "none" or self.spkv is not None):
            errs.append("short_conv: the conv control is for separate projections without SP-KV; "
                        f"got share: {self.share}, spkv: {'set' if self.spkv is not None else 'null'}")
        if self.value_shift:
            if self.value_is_key():
                errs.append(f"value_shift: shifts the value projection, which share: {self.share} does not have "
                            "(the key is the value); set share: none or qk, or value_shift: false")
            if self.short_conv is not None:
                errs.append("value_shift: cannot be combined with short_conv (the conv already hands each value "
                            "the previous tokens); set one of them")
            if (self.kv_heads() * self.dim(ctx.d_model)) % 2:
                errs.append(f"value_shift: half of the n_kv_heads * head_dim = {self.kv_heads()} * "
                            f"{self.dim(ctx.d_model)} value channels take the previous token, so the product "
                            "must be even")
        if self.spkv is not None:
            errs += self.spkv.check(ctx)
            if self.pos2d.enabled:
                errs.append("spkv: cannot be combined with pos2d (one per-key score term per layer); "
                            "set pos2d.enabled: false or spkv: null")
            if self.sliding_window is not None:
                errs.append("spkv: cannot be combined with sliding_window, which already drops old keys; "
                            "set sliding_window: null or spkv: null")
        return errs

    def rope(self, ctx: MixerContext) -> bool:
        return (self.pos or ("rope" if ctx.pos == "rope" else "none")) == "rope"


class HeadGroup(NamedTuple):
    """Heads that attend alike: KV heads `kv` and the query heads `q` that read them (None: all), window `window`."""

    kv: tuple[int, ...] | None
    q: tuple[int, ...] | None
    window: int | None

    def take(self, x_BTH_: jax.Array, query: bool = False) -> jax.Array:
        """x's heads (axis 2) of this group: its query heads with `query`, else its KV heads."""
        idx = self.q if query else self.kv
        return x_BTH_ if idx is None else jnp.take(x_BTH_, jnp.asarray(idx, jnp.int32), axis=2)


def head_groups(cfg: SoftmaxConfig) -> tuple[HeadGroup, ...]:
    """The layer's head groups: all heads at `sliding_window`, or with local_heads the global heads (no window)
    then the local ones."""
    if cfg.local_heads is None:
        return (HeadGroup(None, None, cfg.sliding_window),)
    group = cfg.n_heads // cfg.kv_heads()
    local = sorted(cfg.local_heads)
    split = ([h for h in range(cfg.kv_heads()) if h not in local], None), (local, cfg.sliding_window)
    return tuple(HeadGroup(tuple(kv), tuple(h * group + j for h in kv for j in range(group)), window)
                 for kv, window in split if kv)


def sincos_features(positions: jax.Array, dim: int) -> jax.Array:
    """Transformer sinusoids of integer positions, [..., dim] fp32: channel 2i is sin(p·ω_i), 2i+1 is
    cos(p·ω_i), ω_i = 10000^(-2i/dim); an odd dim ends on a sin."""
    omega = 10000.0 ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = positions.astype(jnp.float32)[..., None] * omega
    pairs = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return pairs.reshape(*angles.shape[:-1], -1)[..., :dim]


class SoftmaxAttention(nnx.Module):
    stat_reporters = (spkv.report,)

    def __init__(self, cfg: SoftmaxConfig, ctx: MixerContext, *, rngs: nnx.Rngs):
        self.cfg, self.ctx = cfg, ctx
        d, H, Hkv, hd = ctx.d_model, cfg.n_heads, cfg.kv_heads(), cfg.dim(ctx.d_model)
        self.H, self.Hkv, self.hd = H, Hkv, hd
        lin = dict(bias=ctx.bias, std=ctx.init_std, dtype=ctx.dtype, rngs=rngs)
        self.q_proj = None if cfg.query_is_key() else Linear(d, H * hd, axes=("embed", "heads"), **lin)
        self.k_proj = Linear(d, Hkv * hd, axes=("embed", "kv_heads"), **lin)
        self.v_proj = None if cfg.value_is_key() else Linear(d, Hkv * hd, axes=("embed", "kv_heads"), **lin)
        self.o_proj = Linear(H * hd, d, axes=("heads", "embed"), **{**lin, "std": ctx.out_std})
        norm_q = cfg.qk_norm and self.q_proj is not None
        self.q_norm = RMSNorm(hd, eps=ctx.norm_eps, axes=(None,)) if norm_q else None
        self.k_norm = RMSNorm(hd, eps=ctx.norm_eps, axes=(None,)) if cfg.qk_norm else None
        self.pos2d_w = param(rngs, normal(POS2D_INIT_STD), (cfg.pos2d.channels,), (None,)) \
            if cfg.pos2d.enabled else None
        self.spkv = SPKVGate(cfg.spkv, ctx, Hkv, rngs=rngs) if cfg.spkv is not None else None
        self.use_rope = cfg.rope(ctx)
        self.convs = self._short_convs(cfg, ctx, rngs) if cfg.short_conv is not None else None
        self.shift_from = Hkv * hd // 2 if cfg.value_shift else None
        self.groups = head_groups(cfg)
        # Query head order after the groups' outputs are concatenated.
        self.q_order = None if cfg.local_heads is None else \
            tuple(int(i) for i in np.argsort([h for g in self.groups for h in g.q]))

    def _short_convs(self, cfg: SoftmaxConfig, ctx: MixerContext, rngs: nnx.Rngs) -> nnx.Dict:
        """Depthwise conv weights [W, width] for q, k and v, initialised as KDAConfig.conv_init describes."""
        W = cfg.short_conv
        init = (lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -W ** -0.5, W ** -0.5)) \
            if cfg.short_conv_init == "uniform" else normal(ctx.init_std)
        return nnx.Dict({name: param(rngs, init, (W, n * self.hd), (None, axis)) for name, n, axis in
                         (("q", self.H, "heads"), ("k", self.Hkv, "kv_heads"), ("v", self.Hkv, "kv_heads"))})

    def _heads(self, y_BTX: jax.Array, n_heads: int) -> jax.Array:
        return y_BTX.reshape(*y_BTX.shape[:2], n_heads, self.hd)

    def _project(self, x_BTD: jax.Array, history: dict | None = None, doc_pos: jax.Array | None = None):
        """Per-head (q, k, v) before qk-norm and RoPE; a shared one is k_proj's output itself. With short_conv
        each projection goes through its causal conv and SiLU first; `history` holds the last W-1 raw
        projections before x (zeros when None), `doc_pos` each token's position in its document (a tap never
        reads across a document start). Returns (q, k, v, the new history or None)."""
        if self.convs is None:
            k = self._heads(self.k_proj(x_BTD), self.Hkv)
            q = k if self.q_proj is None else self._heads(self.q_proj(x_BTD), self.H)
            v = k if self.v_proj is None else self._heads(self.v_proj(x_BTD), self.Hkv)
            return q, k, v, None
        out, new_history = {}, {}
        for name, proj in (("q", self.q_proj), ("k", self.k_proj), ("v", self.v_proj)):
            raw = proj(x_BTD)
            w = self.convs[name][...]
            hist = jnp.zeros((raw.shape[0], w.shape[0] - 1, raw.shape[2]), raw.dtype) if history is None \
                else history[name]
            new_history[name] = jnp.concatenate([hist, raw.astype(hist.dtype)], axis=1)[:, -(w.shape[0] - 1):]
            out[name] = jax.nn.silu(causal_conv(raw, w, hist, doc_pos)).astype(raw.dtype)
        return (self._heads(out["q"], self.H), self._heads(out["k"], self.Hkv), self._heads(out["v"], self.Hkv),
                new_history)

    def _shift_fill(self):
        """What the shifted value half reads before a document starts: the projection of a zero row."""
        b = self.v_proj.bias
        return 0.0 if b is None else b[...][self.shift_from:].astype(self.ctx.dtype)

    def _shift_values(self, v_BTHD: jax.Array, doc_pos_BT: jax.Array | None = None,
                      prev_BW: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """value_shift: channels [shift_from:] of each value row from the row before, in the forward from
        `doc_pos_BT` (None: one document), in decode the previous token's half row `prev_BW`. Returns the values
        and the last row's own half (the next decode step's `prev_BW`)."""
        v_BTW = v_BTHD.reshape(*v_BTHD.shape[:2], -1)
        late = v_BTW[..., self.shift_from:]
        shifted = delay(late, 1, doc_pos_BT, self._shift_fill()) if prev_BW is None \
            else prev_BW[:, None].astype(late.dtype)
        v_BTW = jnp.concatenate([v_BTW[..., :self.shift_from], shifted], axis=-1)
        return v_BTW.reshape(v_BTHD.shape), late[:, -1]

    def _for_logits(self, x_BTHD: jax.Array, norm: RMSNorm | None, positions_BT: jax.Array) -> jax.Array:
        """What the scores see of a query or key: qk-norm, then RoPE (values never come through here)."""
        if norm is not None:
            x_BTHD = norm(x_BTHD)
        if self.use_rope:
            x_BTHD = apply_rope(x_BTHD, positions_BT, self.ctx.rope_theta)
        return x_BTHD

    def _logit_qk(self, q_BTHD: jax.Array, k_BTHD: jax.Array, positions_BT: jax.Array):
        """The query and key the scores use; with share qk|qkv the query is the key array."""
        k = self._for_logits(k_BTHD, self.k_norm, positions_BT)
        q = k if self.q_proj is None else self._for_logits(q_BTHD, self.q_norm, positions_BT)
        if self.pos2d_w is not None:
            # S' = S·Σw + ...: scaling the query keeps the op's `scale` a static number.
            q = q * jnp.sum(self.pos2d_w[...]).astype(q.dtype)
        return q, k

    def _key_log_gate(self, positions: jax.Array, x_BSD: jax.Array | None = None,
                      segment_ids: jax.Array | None = None) -> tuple[jax.Array | None, int | None]:
        """The per-key score term [B,S,Hkv] for the op and the local window it spares (None: every key):
        SP-KV's write gate from the keys' inputs x (decode passes no x: its pruned cache has applied the
        gate by keeping or dropping keys), pos2d's bias (see the module docstring) at `positions` [B,S] (or
        [B,S,Hkv]: a pruned cache's slots hold different positions per head), or (None, None)."""
        if self.spkv is not None:
            return (None, None) if x_BSD is None else (self.spkv(x_BSD, segment_ids), self.spkv.window)
        if self.pos2d_w is None:
            return None, None
        bias = self._pos2d_bias(positions)
        if bias.ndim == 2:
            bias = jnp.broadcast_to(bias[..., None], (*bias.shape, self.Hkv))
        return bias, None

    def _pos2d_bias(self, positions: jax.Array) -> jax.Array:
        """pos2d's per-key bias (<= 0) at `positions`, of their shape."""
        w_col = self.pos2d_w[...][self.cfg.pos2d.channels // 2:]
        return jnp.sum(sincos_features(positions, w_col.shape[0]) * w_col, axis=-1) - jnp.sum(jnp.abs(w_col))

    def __call__(self, x_BTD: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        B, T, _ = x_BTD.shape
        local_state = self.convs is not None or self.shift_from is not None
        doc_pos = None if segment_ids is None or not local_state else positions_from_segments(segment_ids)
        q_raw, k_raw, v, _ = self._project(x_BTD, doc_pos=doc_pos)
        if self.shift_from is not None:
            v, _ = self._shift_values(v, doc_pos)
        q, k = self._logit_qk(q_raw, k_raw, positions)
        gate, local_window = self._key_log_gate(positions, x_BTD, segment_ids)
        outs = []
        for g in self.groups:
            k_g = g.take(k)
            outs.append(ops.softmax_attention(
                g.take(q, query=True), k_g, k_g if v is k else g.take(v), causal=True, sliding_window=g.window,
                local_window=local_window, key_log_gate=None if gate is None else g.take(gate),
                segment_ids=segment_ids, scale=self.cfg.scale, impl=self.ctx.impl))
        return self.o_proj(self._merge_heads(outs).reshape(B, T, self.H * self.hd))

    def _merge_heads(self, outs: list[jax.Array]) -> jax.Array:
        """The groups' outputs [B,T,Hq_g,D] in the layer's query head order."""
        if self.q_order is None:
            return outs[0]
        return jnp.take(jnp.concatenate(outs, axis=2), jnp.asarray(self.q_order, jnp.int32), axis=2)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32, policy: CachePolicy | None = None) -> dict:
        """The dense KV cache (a ring of `sliding_window` slots for a sliding-window layer), or the pruned one
        (`attention.cache_policies`) under `policy`, by default SP-KV's on an SP-KV layer."""
        dims = {"k": self.hd} if self.v_proj is None else {"k": self.hd, "v": self.hd}
        if policy is None and self.spkv is not None:
            policy = CachePolicy("spkv")
        if policy is not None:
            if self.cfg.sliding_window is not None:
                raise CachePolicyError("a sliding-window layer already holds only its window (with local_heads, its "
                                       "local heads do); cache policies apply to layers whose every head reads the "
                                       "whole context")
            cache = cache_policies.init(policy, batch, self.Hkv, dims, dtype, max_len, spkv=self.cfg.spkv)
        else:
            # Sliding-window heads keep only their last `window` keys: a ring of that many slots.
            rings = [{name: jnp.zeros((batch, max_len if g.window is None else min(max_len, g.window),
                                       self.Hkv if g.kv is None else len(g.kv), dim), dtype)
                      for name, dim in dims.items()} for g in self.groups]
            cache = rings[0] if len(rings) == 1 else {"groups": rings}
        if self.convs is not None:
            cache["conv"] = {name: jnp.zeros((batch, w.shape[0] - 1, w.shape[1]), dtype)
                             for name, w in self.convs.items()}
        if self.shift_from is not None:
            late = self.Hkv * self.hd - self.shift_from
            cache["v_shift"] = jnp.broadcast_to(self._shift_fill(), (batch, late)).astype(dtype)
        return cache

    def decode(self, x_B1D: jax.Array, cache: dict, position: jax.Array) -> tuple[jax.Array, dict]:
        B = x_B1D.shape[0]
        pos_B1 = jnp.full((B, 1), position, jnp.int32)
        q_raw, k_raw, v_raw, conv_history = self._project(x_B1D, cache.get("conv"))
        if self.shift_from is not None:
            v_raw, v_shift = self._shift_values(v_raw, prev_BW=cache["v_shift"])
        q, k = self._logit_qk(q_raw, k_raw, pos_B1)
        # K=V: the cache holds the projection before norm/RoPE, i.e. the value; keys are derived from it.
        entries = {"k": k_raw} if self.v_proj is None else {"k": k, "v": v_raw}
        policy = cache.get("policy")
        if policy is None:
            rings = cache["groups"] if len(self.groups) > 1 else [cache]
            outs, new_rings = [], []
            for g, ring in zip(self.groups, rings):
                ring, pos_BSH, lengths = self._ring_append(ring, {n: g.take(e) for n, e in entries.items()}, position)
                outs.append(self._read(g.take(q, query=True), ring, pos_BSH, lengths))
                new_rings.append(ring)
            new_cache = {**cache, "groups": new_rings} if len(self.groups) > 1 else {**cache, **new_rings[0]}
            o = self._merge_heads(outs)
        else:
            gate = {} if self.spkv is None else self.spkv.cache_gate(x_B1D)
            new_cache = cache_policies.append(cache, entries, position, layer_idx=self.ctx.layer_idx, **gate)
            value = "k" if self.v_proj is None else "v"
            o = self._read(q, new_cache, new_cache["pos"], pruned_cache.ring_lengths(new_cache, position),
                           pruned_cache.key_pages(new_cache, value))
            derive = {} if self.v_proj is not None else self._derived_keys(None)
            new_cache = policy.observe(new_cache, q, position, scale=self.cfg.scale or self.hd ** -0.5, **derive)
        if conv_history is not None:
            new_cache["conv"] = conv_history
        if self.shift_from is not None:
            new_cache["v_shift"] = v_shift.astype(cache["v_shift"].dtype)
        return self.o_proj(o.reshape(B, 1, self.H * self.hd)), new_cache

    def _ring_append(self, ring: dict, entries: dict, position) -> tuple[dict, jax.Array, jax.Array]:
        """Write the token at `position` into a dense cache of S slots; returns it with each slot's position
        [B,S,Hkv] and the held length [B,Hkv]. Slot position % S: the token's own index while the cache holds the
        whole context, a ring of the last S tokens for a sliding window (S = the window). Slot s holds the newest
        position <= the current one that is congruent to s; negative: not written yet."""
        B, S, H = ring["k"].shape[:3]
        ring = {name: jax.lax.dynamic_update_slice_in_dim(ring[name], e.astype(ring[name].dtype), position % S, axis=1)
                for name, e in entries.items()}
        # Slots [0, min(position + 1, S)) are written, and a ring of S = window slots holds exactly the window: the
        # held length is all the op needs.
        pos_S = position - jnp.mod(position - jnp.arange(S), S)
        return (ring, jnp.broadcast_to(pos_S[None, :, None], (B, S, H)),
                jnp.full((B, H), jnp.minimum(position + 1, S), jnp.int32))

    def _read(self, q: jax.Array, cache: dict, pos_BSH: jax.Array, lengths: jax.Array, pages=None) -> jax.Array:
        """The decode op over a cache's held slots (and a pruned cache's store, `pages`); a K=V cache holds the
        values and the op derives the keys."""
        derive = {} if self.v_proj is not None else self._derived_keys(pos_BSH)
        values = cache["k"] if self.v_proj is None else cache["v"]
        gate, _ = self._key_log_gate(pos_BSH)
        if pages is not None and gate is not None:
            pages = pages._replace(key_log_gate=self._pos2d_bias(pages.positions))
        return ops.softmax_decode(q, cache["k"], values, lengths=lengths, key_log_gate=gate, scale=self.cfg.scale,
                                  pages=pages, impl=self.ctx.impl, **derive)

    def _derived_keys(self, pos_BSH: jax.Array | None) -> dict:
        """How the op derives the scores' keys from a K=V cache, which holds the raw shared projection (the
        values): qk-norm, then RoPE at each slot's own position (a pruned cache keeps different positions per
        head; None: left to the caller). The op reads the one cached array for both; the Pallas kernel derives keys
        per tile, in fp32."""
        derive = {}
        if self.k_norm is not None:
            derive |= dict(key_norm_scale=self.k_norm.scale[...], key_norm_eps=self.k_norm.eps)
        if self.use_rope:
            derive |= dict(key_rope_theta=self.ctx.rope_theta, key_positions=pos_BSH)
        return derive

    def schedule_values(self, step: int, total: int) -> dict[str, float]:
        return {} if self.spkv is None else self.spkv.schedule_values(step, total)

    def _token_bytes(self, dtype_bytes: int | None = None, group: HeadGroup | None = None) -> int:
        """Cache bytes of one token (of a head group's KV heads; None: all)."""
        nbytes = dtype_bytes or jnp.dtype(self.ctx.dtype).itemsize
        heads = self.Hkv if group is None or group.kv is None else len(group.kv)
        return (1 if self.v_proj is None else 2) * heads * self.hd * nbytes

    def cache_bytes_per_token(self, dtype_bytes: int | None = None) -> int:
        """What the cache grows by per token: the heads that read the whole context (a window's ring is fixed:
        state_bytes)."""
        return sum(self._token_bytes(dtype_bytes, g) for g in self.groups if g.window is None)

    def state_bytes(self) -> int:
        """The fixed part of the cache: a sliding window's ring of `sliding_window` keys (and values), with
        short_conv the last W-1 raw q, k, v projections, with value_shift the previous token's shifted half row."""
        ring = sum(g.window * self._token_bytes(group=g) for g in self.groups if g.window is not None)
        values = 0 if self.shift_from is None else self.Hkv * self.hd - self.shift_from
        if self.convs is not None:
            values += (self.cfg.short_conv - 1) * sum(w.shape[1] for w in self.convs.values())
        return ring + values * jnp.dtype(self.ctx.dtype).itemsize

    def flops_per_token(self, seq_len: int) -> float:
        """Matmul FLOPs: the projections that exist (3nd² -> 2nd² -> nd² as q and v share k's), the output
        projection, and QKᵀ plus PV over the visible keys. pos2d adds its elementwise work: scaling the query
        by Σw (H·hd), the key's bias (a product and a sum per column channel) and one add per visible score."""
        d, H, Hkv, hd = self.ctx.d_model, self.H, self.Hkv, self.hd
        proj_out = (0 if self.q_proj is None else H * hd) + Hkv * hd + (0 if self.v_proj is None else Hkv * hd)
        # QK^T and PV of each head group over the keys its window leaves visible.
        scores = sum((H if g.q is None else len(g.q)) * visible_keys_per_query(seq_len, g.window) for g in self.groups)
        flops = 2 * d * proj_out + 2 * H * hd * d + 4 * hd * scores
        if self.convs is not None:
            flops += 2 * self.cfg.short_conv * proj_out
        if self.pos2d_w is not None:
            m_col = self.cfg.pos2d.channels - self.cfg.pos2d.channels // 2
            flops += H * hd + 2 * m_col + scores
        if self.spkv is not None:
            flops += self.spkv.flops_per_token()
        return flops

