"""SP-KV (Self-Pruned KV attention, Meta FAIR 2026): a learned write gate that decides which keys outlive
the local window. An option (`spkv:`) of the `softmax` and `cca` mixers.

Per layer, a small predictor reads each token's mixer input h (the pre-attention normed activation) and
gives one logit per KV head, the key's "future utility" u = σ(z):

    z = W2 · SiLU(W1 · h + b1) + b2        W1: d_model -> hidden, W2: hidden -> n_kv_heads, b2 starts at init_bias

Query t reads key s unchanged while t - s < window; further back the key's logit gets the gate g_s (through
`ops.softmax_attention`'s key_log_gate and local_window). Under GQA a KV head's gate serves its query heads.

    training                  g = log σ(z)                              soft: gradients say "use it more / less"
    ramp (R steps)            g = log max((1-α)·u + α·1[u ≥ τ], 1e-6)    α = 1/R ... 1; predictor frozen
    hard (rest of the freeze) g = 0 if u ≥ τ else -inf                  predictor frozen, the inference mask
    inference                 g = 0 if u ≥ τ else -inf                  exactly what the pruned cache computes

The freeze covers the last `anneal.freeze_steps` steps and the ramp its first `anneal.ramp_steps` (the paper:
the last 25% of training and 500 steps), so the model trains under the mask it will be evaluated with.

Outside a train step (eval, generation, a mixer called on its own) the gate is the hard one, so eval losses
are the losses a pruned cache gives. The next-token loss alone closes gates; `density_reg` > 0 adds
density_reg · mean(u over the keys that leave the window) per layer as an auxiliary loss.

Statistics, sown per layer as sums: `spkv_kept` [Hkv] (keys that leave the window before their document
ends and have u ≥ τ), `spkv_older` (keys that leave the window) and `spkv_keys` (all keys). `report`
turns their sums into the density per layer and head (the mean of 1[u ≥ τ] over keys outside the window)
and the cache compression factor: the entries a dense cache holds at the end of each sequence (its length
T, per layer and KV head) over those a pruned cache holds then (the window plus the kept older keys),
each summed over SP-KV layers, KV heads and sequences before dividing.

Decode keeps a pruned cache per layer (`attention.pruned_cache`): per sequence and KV head a ring of the last
R = min(window, max_len) tokens, and a store of older keys in pages of a pool the batch's (sequence, KV head)
pairs share, C = `cache.capacity` keys per pair on average (default: every key that can leave the window, so
nothing is ever evicted). A token's keep bit is computed when it arrives; when it leaves the ring it moves to its
pair's store iff the bit is set, at that pair's own length. Only when the pool has no page left does the pair
drop its key of lowest utility (the newcomer's included), counted. Allocated bytes are the rings and the pool,
and decode reads each pair's held slots and pages only.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import pydantic
from flax import nnx
from pydantic import Field

from attention.base import AuxLoss, Heatmap, MixerContext, Stat, StatsByLayer, StatsReport, current_train_step
from attention.layers import normal, param, positions_from_segments

# Floor of the annealed gate: log(1e-6) keeps a closed key's logit finite while it weighs like a dropped one.
MIN_GATE = 1e-6


class AnnealConfig(pydantic.BaseModel):
    """Threshold-aware hard gating (TAHG). In the last `freeze_steps` steps of the run the predictor is frozen;
    over the first `ramp_steps` of them the gate moves linearly from the soft log(u) to the hard 0/-inf mask,
    and the model then trains on under exactly the mask that eval and the pruned cache use. The paper freezes
    the last 25% and ramps over 500 steps. `steps: N` is shorthand for freeze_steps = ramp_steps = N (the ramp
    then ends on the run's last step)."""

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True)

    freeze_steps: int = Field(ge=1)
    ramp_steps: int = Field(ge=1)
    steps: Optional[int] = Field(None, ge=1)  # shorthand: freeze_steps = ramp_steps = steps

    @pydantic.model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("steps") is not None:
            if data.get("freeze_steps") is not None or data.get("ramp_steps") is not None:
                raise ValueError("give steps (both spans) or freeze_steps and ramp_steps, not both")
            data = {**data, "freeze_steps": data["steps"], "ramp_steps": data["steps"]}
        return data

    @pydantic.model_validator(mode="after")
    def _ramp_inside_freeze(self) -> "AnnealConfig":
        if self.ramp_steps > self.freeze_steps:
            raise ValueError(f"ramp_steps {self.ramp_steps} is longer than freeze_steps {self.freeze_steps}: the "
                             f"gate hardens while the predictor is frozen, so the ramp must fit in that span")
        return self


class SPKVCacheConfig(pydantic.BaseModel):
    """The pruned decode cache: besides the ring of `window` recent keys, a store of `capacity` older keys per
    sequence and KV head on average (the stores share a pool of pages, so a denser head or sequence holds more
    while a sparser one holds less): a share (float in (0, 1]) of the keys that can leave the window, or a number
    of keys (int >= 1); null: all of them (nothing is ever evicted, and the cache is allocated for the worst
    case). `attnlab info RUN` suggests one from the run's measured densities."""

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True)

    capacity: Optional[Union[pydantic.StrictInt, pydantic.StrictFloat]] = None

    @pydantic.field_validator("capacity")
    @classmethod
    def _capacity(cls, v):
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError(f"a share of the older keys must be in (0, 1], got {v}; for a number of keys give an "
                             f"integer")
        if isinstance(v, int) and v < 1:
            raise ValueError(f"a number of keys must be at least 1, got {v}")
        return v


class SPKVConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True)

    window: int = Field(128, ge=1)  # recent keys every query reads ungated (including itself)
    threshold: float = Field(0.5, gt=0, lt=1)  # τ: an older key stays in the cache iff u >= τ
    hidden: Optional[int] = Field(None, ge=1)  # predictor width; None: d_model // 4
    init_bias: float = 5.0  # b2 at init: σ(5) ≈ 0.993, every gate open
    lr_mult: float = Field(5.0, gt=0)  # predictor learning rate = lr_mult * optim.lr
    anneal: Optional[AnnealConfig] = None
    density_reg: float = Field(0.0, ge=0)  # weight of the mean-utility penalty; 0: no auxiliary loss
    cache: SPKVCacheConfig = Field(default_factory=SPKVCacheConfig)

    def check(self, ctx: MixerContext) -> list[str]:
        errs = []
        if self.window >= ctx.seq_len:
            errs.append(f"spkv.window: {self.window} leaves no key outside the window at data.seq_len "
                        f"{ctx.seq_len}, so nothing could be pruned; use a window below {ctx.seq_len}")
        if self.anneal is not None and ctx.train_steps is not None and self.anneal.freeze_steps > ctx.train_steps:
            errs.append(f"spkv.anneal.freeze_steps: {self.anneal.freeze_steps} is more than train.steps "
                        f"{ctx.train_steps}; freeze the last part of the run (e.g. {max(ctx.train_steps // 4, 1)})")
        return errs


def anneal_alpha(step: jax.Array, total: int, freeze_steps: int, ramp_steps: int) -> jax.Array:
    """α of 0-based step `step`: 0 before the last `freeze_steps` steps, then 1/R, 2/R, ..., 1 over the first R =
    `ramp_steps` of them, and 1 (the hard mask) from there to the end."""
    start = total - freeze_steps
    return jnp.clip((step + 1 - start) / ramp_steps, 0.0, 1.0).astype(jnp.float32)


def _leaves_window(batch: int, T: int, window: int, segment_ids_BT: jax.Array | None) -> jax.Array:
    """[B,T] bool: key s is read from outside the window by a later query of its own document."""
    if segment_ids_BT is None:
        remaining_T = T - 1 - jnp.arange(T)
        return jnp.broadcast_to(remaining_T >= window, (batch, T))
    remaining_BT = positions_from_segments(segment_ids_BT[:, ::-1])[:, ::-1]
    return remaining_BT >= window


class SPKVGate(nnx.Module):
    """The utility predictor of one layer, its gate on the attention logits and its pruned decode cache."""

    def __init__(self, cfg: SPKVConfig, ctx: MixerContext, n_kv_heads: int, *, rngs: nnx.Rngs):
        self.cfg, self.window, self.Hkv, self.layer_idx = cfg, cfg.window, n_kv_heads, ctx.layer_idx
        d, hidden = ctx.d_model, cfg.hidden or max(ctx.d_model // 4, 1)
        meta = dict(lr_mult=cfg.lr_mult, frozen_last_steps=cfg.anneal.freeze_steps if cfg.anneal else 0)
        self.w1 = param(rngs, normal(ctx.init_std), (d, hidden), ("embed", None), **meta)
        self.b1 = param(None, jnp.zeros((hidden,)), (hidden,), (None,), decay=False, **meta)
        self.w2 = param(rngs, normal(ctx.init_std), (hidden, n_kv_heads), (None, "kv_heads"), **meta)
        self.b2 = param(None, jnp.full((n_kv_heads,), cfg.init_bias), (n_kv_heads,), ("kv_heads",),
                        decay=False, **meta)
        # u >= τ  <=>  z >= logit(τ): deciding on z keeps the forward and decode decisions identical.
        self.logit_threshold = math.log(cfg.threshold / (1.0 - cfg.threshold))

    def logits(self, x_BTD: jax.Array) -> jax.Array:
        """z [B,T,Hkv] in fp32."""
        h = jax.nn.silu(jnp.dot(x_BTD.astype(jnp.float32), self.w1[...]) + self.b1[...])
        return jnp.dot(h, self.w2[...]) + self.b2[...]

    def __call__(self, x_BTD: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """key_log_gate [B,T,Hkv] for the keys of x (to apply with local_window=self.window); sows the
        statistics and, while training with density_reg, the auxiliary loss."""
        B, T, _ = x_BTD.shape
        z = self.logits(x_BTD)
        keep = z >= self.logit_threshold
        train_step = current_train_step()
        hard = jnp.where(keep, 0.0, -jnp.inf)
        if train_step is None:
            gate = hard
        else:
            gate = jax.nn.log_sigmoid(z)
            if self.cfg.anneal is not None:
                alpha = self._alpha(train_step.step, train_step.total)
                u_hat = (1.0 - alpha) * jax.nn.sigmoid(z) + alpha * keep
                annealed = jnp.log(jnp.maximum(u_hat, MIN_GATE))
                # Once the ramp is done, training sees exactly the inference mask (-inf, not log 1e-6).
                gate = jnp.where(alpha >= 1, hard, jnp.where(alpha > 0, annealed, gate))
        older_BT = _leaves_window(B, T, self.window, segment_ids)
        self.sow(Stat, "spkv_kept", jnp.sum(keep & older_BT[..., None], axis=(0, 1)))
        self.sow(Stat, "spkv_older", jnp.sum(older_BT))
        self.sow(Stat, "spkv_keys", jnp.int32(B * T))
        if self.cfg.density_reg and train_step is not None:
            older = older_BT[..., None].astype(jnp.float32)
            mean_u = jnp.sum(jax.nn.sigmoid(z) * older) / jnp.maximum(jnp.sum(older) * self.Hkv, 1.0)
            self.sow(AuxLoss, "spkv_density", self.cfg.density_reg * mean_u)
        return gate

    def _alpha(self, step, total: int):
        a = self.cfg.anneal
        return anneal_alpha(step, total, a.freeze_steps, a.ramp_steps)

    def schedule_values(self, step: int, total: int) -> dict[str, float]:
        """The gate's place on its schedule at 0-based step `step`: 0 soft, 1 the hard mask."""
        return {} if self.cfg.anneal is None else {"spkv_ramp": float(self._alpha(step, total))}

    # -- pruned decode cache ------------------------------------------------------------------------

    def cache_gate(self, x_B1D: jax.Array) -> dict:
        """What the spkv cache policy (`attention.cache_policies`) reads of a decode step's token: its utility
        logits [B,Hkv] from its mixer input x and the logit of tau (a key enters the store iff kept; a full pool
        drops its pair's least useful key)."""
        return dict(utility=self.logits(x_B1D)[:, 0], threshold=self.logit_threshold)

    def flops_per_token(self) -> float:
        d, hidden = self.w1.shape
        return 2.0 * hidden * (d + self.Hkv)


def report(stats: StatsByLayer) -> StatsReport:
    """Eval metrics from SP-KV statistics summed over batches, by block label (empty without SP-KV layers):
    spkv_density (all SP-KV layers and heads), spkv_density/<label>, spkv_density_heads {label: [per KV
    head]} and spkv_compression (see the module docstring); the per-head densities as a heatmap."""
    out: dict[str, Any] = {}
    heads: dict[str, list[float]] = {}
    kept_all = older_all = full_all = pruned_all = 0.0
    for label, s in stats.items():
        if "spkv_kept" not in s:
            continue
        kept_H = np.asarray(s["spkv_kept"], np.float64)
        older, keys, H = float(s["spkv_older"]), float(s["spkv_keys"]), kept_H.size
        heads[label] = (kept_H / max(older, 1.0)).tolist()
        out[f"spkv_density/{label}"] = float(kept_H.sum() / max(older * H, 1.0))
        kept_all += kept_H.sum()
        older_all += older * H
        full_all += keys * H
        pruned_all += (keys - older) * H + kept_H.sum()
    if not heads:
        return StatsReport()
    out["spkv_density"] = float(kept_all / max(older_all, 1.0))
    out["spkv_compression"] = float(full_all / pruned_all)
    out["spkv_density_heads"] = heads
    heatmap = Heatmap(heads, title="SP-KV gate density (kept share of older keys)", xlabel="KV head")
    summary = f"SP-KV density {out['spkv_density']:.3f} (cache {out['spkv_compression']:.2f}x smaller)"
    return StatsReport(out, {"spkv_density_heads": heatmap}, [summary])
