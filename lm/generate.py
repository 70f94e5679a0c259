"""Autoregressive generation with a fixed-shape cache under jit: greedy, temperature, top-k, top-p; the
checks of a request against the sampling rules and the context the model was trained on; generation past
that context in a sliding window; the model's decode caches, optionally under a cache policy."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp

from attention.cache_policies import CachePolicy, CachePolicyError
from lm.config import Config
from lm.model import ModelDef
from lm.train.rundir import RunError

DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40


class GenerationError(RunError):
    """A generation request that cannot be served as asked; the message says what to change."""


def sampling_settings(*, greedy: bool = False, temperature: float | None = None, top_k: int | None = None,
                      top_p: float | None = None) -> dict:
    """The `temperature`/`top_k`/`top_p` arguments of `generate_ids` for a request, checked. Unset values take
    the defaults (temperature 0.8, top-k 40, no top-p); `greedy` takes the most likely token (temperature 0
    inside `generate_ids`) and no other setting."""
    if greedy:
        given = [flag for flag, v in (("--temperature", temperature), ("--top-k", top_k), ("--top-p", top_p))
                 if v is not None]
        if given:
            raise GenerationError(f"--greedy takes the most likely token and no sampling setting; drop "
                                  f"{' and '.join(given)} or --greedy")
        return {"temperature": 0.0, "top_k": None, "top_p": None}
    if temperature is not None and not temperature > 0:
        raise GenerationError(f"--temperature must be greater than 0 (got {temperature}); for greedy decoding use "
                              f"--greedy")
    if temperature is not None and not math.isfinite(temperature):
        raise GenerationError(f"--temperature must be finite (got {temperature}); e.g. 0.8")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"--top-k must be at least 1 (got {top_k}); a value of at least the vocabulary size "
                              f"keeps every token")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"--top-p must be in (0, 1] (got {top_p}); 1 keeps every token")
    return {"temperature": DEFAULT_TEMPERATURE if temperature is None else float(temperature),
            "top_k": DEFAULT_TOP_K if top_k is None else int(top_k),
            "top_p": None if top_p is None else float(top_p)}


@dataclasses.dataclass(frozen=True)
class LengthPlan:
    """How a request fits the model's context: `window` is None for one pass over prompt and continuation, or
    the tokens of context when generating in a sliding window; `note` says what the user should know."""

    window: int | None = None
    note: str | None = None


def slide_keep(window: int) -> int:
    """Tokens a full window keeps when it slides (the rest of it is generated again from them)."""
    return max(1, window // 2)


def plan_length(cfg: Config, *, n_prompt: int, max_new_tokens: int, slide: bool = False,
                extrapolate: bool = False) -> LengthPlan:
    """Check `n_prompt + max_new_tokens` tokens against the context `cfg`'s model was trained on.

    Every model was trained on windows of `data.seq_len` tokens, which is the default limit for every
    positional scheme. Past it: `slide` generates in a window of `data.seq_len` tokens that moves on by
    half its length when full (the model never sees a position it was not trained at); `extrapolate` runs
    on past it for RoPE and NoPE models (positions never trained), and for learned positions up to
    `model.max_seq_len`, the end of the position table. Raises GenerationError naming the numbers otherwise.
    """
    m, C = cfg.model, cfg.data.seq_len
    total = n_prompt + max_new_tokens
    if total <= C:
        return LengthPlan()
    if slide and extrapolate:
        raise GenerationError("give one of --slide or --extrapolate, not both")
    learned = m.pos == "learned"
    table = m.max_seq_len if learned else None
    if slide:
        keep = slide_keep(C)
        dropped = f"; the prompt's first {n_prompt - keep} tokens are outside it" if n_prompt >= C else ""
        return LengthPlan(window=C, note=(
            f"{total} tokens are more than the {C} the model was trained on (data.seq_len={C}): generating in a "
            f"sliding {C}-token window; when it is full, generation goes on from its last {keep} tokens{dropped}"))
    if extrapolate and (table is None or table > C):
        if table is not None and total > table:
            raise GenerationError(f"{total} tokens (prompt {n_prompt} + --max-new-tokens {max_new_tokens}) go past "
                                  f"the learned position table (model.max_seq_len={table}); give at most "
                                  f"{table - n_prompt} new tokens, or --slide instead of --extrapolate")
        what = (f"positions {C} to {total - 1} have learned embeddings that were never trained" if learned else
                f"extrapolating: the model never saw positions past {C - 1}")
        return LengthPlan(note=f"{total} tokens are more than the {C} the model was trained on "
                               f"(data.seq_len={C}); {what}, so expect the text to degrade")
    if extrapolate:  # learned positions whose table ends at the training length
        raise GenerationError(f"learned positions stop at model.max_seq_len={table}, and {total} tokens (prompt "
                              f"{n_prompt} + --max-new-tokens {max_new_tokens}) go past it; use --slide instead "
                              f"of --extrapolate, or give at most {table - n_prompt} new tokens")
    scheme = {"rope": "RoPE", "none": "no positional encoding", "learned": "learned positions"}[m.pos]
    fit = (f"give at most {C - n_prompt} new tokens or a shorter prompt" if n_prompt < C else
           f"shorten the prompt to under {C} tokens")
    ways = "--slide to generate in a sliding window"
    if not learned or table > C:
        ways += ", or --extrapolate to run past what it was trained on"
    raise GenerationError(
        f"the prompt ({n_prompt} tokens) and --max-new-tokens {max_new_tokens} make {total} tokens, more than the "
        f"{C} the model was trained on (data.seq_len={C}, {scheme}{f', model.max_seq_len={table}' if learned else ''}"
        f"); {fit}, or {ways}")


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


def init_caches(model, batch: int, max_len: int, policy: CachePolicy | None = None) -> list:
    """The model's decode caches for `max_len` tokens. Under a cache policy (`attention.cache_policies`) every
    layer whose cache takes one (softmax layers reading the whole context) gets a pruned cache under it, and
    layers whose state does not grow (linear mixers, sliding windows) keep theirs. GenerationError when a layer
    with a growing cache cannot take the policy, or when the policy cannot run on a layer."""
    if policy is None:
        return model.init_cache(batch, max_len)
    caches, took = [], 0
    for block in model.blocks:
        mixer = block.mixer
        growing = mixer.cache_bytes_per_token() > 0
        if growing and "policy" not in inspect.signature(mixer.init_cache).parameters:
            raise GenerationError(f"layer {block.label} ({type(mixer).__name__}) keeps a growing cache that takes no "
                                  f"cache policy; policies apply to softmax layers")
        try:
            caches.append(mixer.init_cache(batch, max_len, model.dtype, **({"policy": policy} if growing else {})))
        except CachePolicyError as e:
            raise GenerationError(f"layer {block.label}: {e}") from None
        took += growing
    if not took:
        raise GenerationError("no layer of this model keeps a growing KV cache: there is nothing for a cache policy "
                              "to prune")
    return caches


@functools.partial(jax.jit, static_argnames=("mdef", "max_new_tokens", "temperature", "top_k", "top_p", "policy"))
def generate_ids(mdef: ModelDef, params, prompt_BP: jax.Array, key: jax.Array, *, max_new_tokens: int,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 policy: CachePolicy | None = None) -> jax.Array:
    """Prompt ids [B,P] -> [B, P + max_new_tokens]. The prompt is fed through the same decode path, with the
    model's caches or, with `policy`, pruned ones under it (`init_caches`)."""
    model = mdef.merge(params)
    B, P = prompt_BP.shape
    total = P + max_new_tokens
    m = model.cfg.model
    if m.pos == "learned" and total - 1 > m.max_seq_len:  # the last token is sampled, never fed back
        raise GenerationError(f"{P} + {max_new_tokens} tokens go past the learned position table "
                              f"(model.max_seq_len={m.max_seq_len}); see plan_length")
    cache, logits_PBV = prefill(model, prompt_BP, init_caches(model, B, total, policy))
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


def decode_logits(mdef: ModelDef, params, tokens_BT: jax.Array, policy: CachePolicy | None = None) -> jax.Array:
    """Logits [B,T,V] computed token by token through the caches (tests compare it with the full forward); with
    `policy`, pruned caches under it (`init_caches`)."""
    model = mdef.merge(params)
    B, T = tokens_BT.shape
    _, out = prefill(model, tokens_BT, init_caches(model, B, T, policy))
    return jnp.swapaxes(out, 0, 1)


def prefill(model, tokens_BT: jax.Array, cache) -> tuple[Any, jax.Array]:
    """Feed tokens [B,T] through the decode path from position 0: (the cache after them, logits [T,B,V])."""

    def body(c, t):
        logits, c = model.decode(jax.lax.dynamic_slice_in_dim(tokens_BT, t, 1, axis=1), c, t)
        return c, logits[:, 0]

    return jax.lax.scan(body, cache, jnp.arange(tokens_BT.shape[1]))


def generate_sliding(mdef: ModelDef, params, prompt_BP: jax.Array, key: jax.Array, *, max_new_tokens: int,
                     window: int, temperature: float = 0.0, top_k: int | None = None,
                     top_p: float | None = None) -> jax.Array:
    """Prompt ids [B,P] -> [B, P + max_new_tokens], never looking at more than `window` tokens (so never at a
    position the model was not trained at). While prompt and continuation fit it is `generate_ids`; past that,
    each pass starts from the last `slide_keep(window)` tokens and fills the window again (a prompt longer
    than the window starts from its end). Every pass after the first has the same shapes: one compilation."""
    P = prompt_BP.shape[1]
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    if P + max_new_tokens <= window:
        return generate_ids(mdef, params, prompt_BP, key, max_new_tokens=max_new_tokens, **kw)
    keep = slide_keep(window)
    out = prompt_BP
    ctx = prompt_BP if P < window else prompt_BP[:, -keep:]
    chunk = 0
    while out.shape[1] < P + max_new_tokens:
        n = window - ctx.shape[1]
        ids = generate_ids(mdef, params, ctx, jax.random.fold_in(key, chunk), max_new_tokens=n, **kw)
        out = jnp.concatenate([out, ids[:, ctx.shape[1]:]], axis=1)
        ctx = out[:, -keep:]
        chunk += 1
    return out[:, :P + max_new_tokens]
