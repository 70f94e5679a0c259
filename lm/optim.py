"""Optimizer: AdamW with a weight-decay mask and per-parameter learning-rate multipliers, LR schedules."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lm.config import OptimConfig


def lr_schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
    """warmup then cosine / linear / WSD (warmup-stable-decay) / constant, ending at lr * min_lr_ratio."""
    peak, end, warm = cfg.lr, cfg.lr * cfg.min_lr_ratio, cfg.warmup_steps
    warmup = optax.linear_schedule(0.0, peak, max(warm, 1)) if warm else optax.constant_schedule(peak)
    rest = max(steps - warm, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, end, rest)
    elif cfg.schedule == "wsd":
        decay = max(int(round(steps * cfg.decay_fraction)), 1)
        stable = max(rest - decay, 0)
        after = optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, end, decay)], [stable])
    else:
        after = optax.constant_schedule(peak)
    return optax.join_schedules([warmup, after], [warm])


def scale_by_tree(mults: Any) -> optax.GradientTransformation:
    """Multiply each update by a per-parameter constant (a params-shaped tree of floats)."""

    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, m: u if m == 1.0 else u * jnp.asarray(m, u.dtype), updates, mults), state

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig, steps: int, meta: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW. `meta` is the params-shaped tree of ParamMeta (decay flag, lr multiplier).

    Gradient clipping is applied by the train step itself (it needs the pre-clip norm for logging and
    for rejecting steps), so it is not part of this chain.
    """
    is_meta = lambda x: hasattr(x, "lr_mult")
    if cfg.wd_mask == "all":
        decay_mask = jax.tree.map(lambda m: not m.never_decay, meta, is_leaf=is_meta)
    else:
        decay_mask = jax.tree.map(lambda m: m.decay and not m.never_decay, meta, is_leaf=is_meta)
    mults = jax.tree.map(lambda m: m.lr_mult, meta, is_leaf=is_meta)
    schedule = lr_schedule(cfg, steps)
    parts = [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)]
    if cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
    if any(m != 1.0 for m in jax.tree.leaves(mults)):
        parts.append(scale_by_tree(mults))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts), schedule


def global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip_by_norm(grads: Any, norm: jax.Array, max_norm: float | None) -> Any:
    if max_norm is None:
        return grads
    factor = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)


def keep_accepted(new: Any, old: Any, ok: jax.Array, accept: Any = None) -> Any:
    """`new` where the update is accepted, else `old`, for the parameters or the optimizer state.

    `ok` decides for the whole step. `accept` (params-shaped bools, optional) decides per parameter in every
    subtree shaped like the parameters (the parameters themselves, Adam's moments); the rest of the state
    (step counts) follows `ok`.
    """
    if accept is None:
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    params_def = jax.tree.structure(accept)
    per_param = lambda x: jax.tree.structure(x) == params_def

    def pick(n, o):
        if per_param(n):
            return jax.tree.map(lambda a, n_, o_: jnp.where(a, n_, o_), accept, n, o)
        return jnp.where(ok, n, o)

    return jax.tree.map(pick, new, old, is_leaf=per_param)
