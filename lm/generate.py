"""Autoregressive generation with a fixed-shape cache under jit: greedy, temperature, top-k, top-p."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lm.model import ModelDef


def sample_logits(logits_BV: jax.Array, key: jax.Array, *, temperature: float, top_k: int | None,
                  top_p: float | None) -> jax.Array:
    """Next token ids [B]. temperature 0 is greedy."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff_idx = jnp.sum(mass_before < top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("mdef", "max_new_tokens", "temperature", "top_k", "top_p"))
def generate_ids(mdef: ModelDef, params, prompt_BP: jax.Array, key: jax.Array, *, max_new_tokens: int,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """Prompt ids [B,P] -> [B, P + max_new_tokens]. The prompt is fed through the same decode path."""
    model = mdef.merge(params)
    B, P = prompt_BP.shape
    total = P + max_new_tokens
    cache = model.init_cache(B, total)

    def prefill(c, t):
        logits, c = model.decode(jax.lax.dynamic_slice_in_dim(prompt_BP, t, 1, axis=1), c, t)
        return c, logits[:, 0]

    cache, logits_PBV = jax.lax.scan(prefill, cache, jnp.arange(P))
    first = sample_logits(logits_PBV[-1], jax.random.fold_in(key, 0), temperature=temperature, top_k=top_k,
                          top_p=top_p)

    def step(carry, t):
        c, tok = carry
        logits, c = model.decode(tok[:, None], c, t)
        nxt = sample_logits(logits[:, 0], jax.random.fold_in(key, t), temperature=temperature, top_k=top_k,
                            top_p=top_p)
        return (c, nxt), tok

    (_, last), toks = jax.lax.scan(step, (cache, first), jnp.arange(P, total - 1))
    new = jnp.concatenate([toks.T, last[:, None]], axis=1) if max_new_tokens > 1 else first[:, None]
    return jnp.concatenate([prompt_BP, new], axis=1)


def decode_logits(mdef: ModelDef, params, tokens_BT: jax.Array) -> jax.Array:
    """Logits [B,T,V] computed token by token through the cache (tests compare it with the full forward)."""
    model = mdef.merge(params)
    B, T = tokens_BT.shape
    cache = model.init_cache(B, T)

    def body(c, t):
        logits, c = model.decode(jax.lax.dynamic_slice_in_dim(tokens_BT, t, 1, axis=1), c, t)
        return c, logits[:, 0]

    _, out = jax.lax.scan(body, cache, jnp.arange(T))
    return jnp.swapaxes(out, 0, 1)
