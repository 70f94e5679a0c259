"""Decode speed and the bytes the real decode caches take, next to `lm.info.model_info`'s analytic numbers.

The caches are the model's own (`LM.init_cache`, each mixer's `decode`), built as `lm.generate` builds them:
room for prompt + steps tokens, the prompt fed token by token through `decode`. Then `steps` greedy decode
steps run as one jitted scan; after a compilation and a warm-up call, each repeat starts from the same prefilled
cache and the median wall time over the repeats gives tokens/s = batch x steps / time.

Bytes are measured on the arrays: the sum of `nbytes` of every cache leaf after decoding. Per layer and per
sequence they split into a part that grows with the cache length and a fixed part, read from the cache shapes
at the run's length and at twice it: bytes_per_token = growth per token, state_bytes = the rest. The analytic
kv_cache_bytes_per_token counts keys and values only, and state_bytes_per_sequence the fixed recurrent and conv
state; they agree with the arrays for plain caches (K=V sharing caches one array, half of K,V's; linear mixers
grow by nothing). A pruned (SP-KV) cache (`attention.pruned_cache`) also records each slot's position and score
(int32 and fp32 per KV head and slot), admission bits for the window, per-head counts and the page table of its
store, a pool of pages the batch's sequences share (a sequence's bytes are its share); with a capacity set its
store does not grow with the length. What it holds is given under `pruned`: the entries present after decoding
times their bytes, against what it allocated and the keys evicted when the pool was full. With a cache policy
(`attention.cache_policies`) every softmax layer reading the whole context decodes through such a cache.
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from attention import pruned_cache
from lm.config import Config
from lm.evals.common import EvalError, can_run_past
from attention.cache_policies import CachePolicy
from lm.generate import init_caches, prefill as prefill_cache
from lm.info import model_info
from lm.model import ModelDef

DEFAULT_BATCH = 8
DEFAULT_STEPS = 32
DEFAULT_REPEATS = 5
PROMPT_SEED = 31_337


def default_lengths(cfg: Config, prompt: int | None, steps: int | None) -> tuple[int, int]:
    """(prompt, steps): by default 32 steps (at most half of data.seq_len) after a prompt that fills the rest
    of data.seq_len, so the cache ends at the length the model trained at."""
    C = cfg.data.seq_len
    steps = steps if steps is not None else min(DEFAULT_STEPS, C // 2)
    prompt = prompt if prompt is not None else max(1, C - steps)
    return prompt, steps


def check_lengths(cfg: Config, prompt: int, steps: int) -> None:
    """EvalError when the model cannot decode prompt + steps tokens (learned positions past their table)."""
    total = prompt + steps
    if not can_run_past(cfg, total):
        raise EvalError(f"--decode-prompt {prompt} + --decode-steps {steps} = {total} tokens go past the learned "
                        f"position table (model.max_seq_len={cfg.model.max_seq_len}); give at most "
                        f"{cfg.model.max_seq_len} in all")


def tree_bytes(tree) -> int:
    """Sum of nbytes over the leaves (arrays or ShapeDtypeStructs)."""
    return int(sum(np.prod(x.shape, dtype=np.int64) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def measure_decode(mdef: ModelDef, params, prompt_BP: np.ndarray, *, steps: int,
                   repeats: int = DEFAULT_REPEATS, policy: CachePolicy | None = None) -> dict:
    """Decode `steps` tokens after `prompt_BP` [B,P]; tokens/s and the caches' bytes (see the module docstring);
    with `policy`, through pruned caches under it (`lm.generate.init_caches`)."""
    B, P = prompt_BP.shape
    total = P + steps
    cfg = mdef.cfg

    @jax.jit
    def prefill(params, prompt):
        model = mdef.merge(params)
        cache, logits_PBV = prefill_cache(model, prompt, init_caches(model, B, total, policy))
        return cache, jnp.argmax(logits_PBV[-1], axis=-1).astype(jnp.int32)

    @jax.jit
    def decode(params, cache, tok_B):
        model = mdef.merge(params)

        def body(carry, t):
            c, tok = carry
            logits, c = model.decode(tok[:, None], c, t)
            return (c, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)), None

        (cache, tok_B), _ = jax.lax.scan(body, (cache, tok_B), jnp.arange(P, total))
        return cache, tok_B

    cache0, tok0 = jax.block_until_ready(prefill(params, jnp.asarray(prompt_BP, jnp.int32)))
    t0 = time.perf_counter()
    jax.block_until_ready(decode(params, cache0, tok0))
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(decode(params, cache0, tok0))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        cache, _ = jax.block_until_ready(decode(params, cache0, tok0))
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {"batch": B, "prompt": P, "steps": steps, "cache_tokens": total, "repeats": repeats,
            "tokens_per_s": B * steps / sec, "ms_per_step": sec / steps * 1e3, "compile_s": compile_s,
            **cache_report(mdef, params, cache, B, total, cfg, policy)}


def cache_report(mdef: ModelDef, params, cache: list, batch: int, length: int, cfg: Config,
                 policy: CachePolicy | None = None) -> dict:
    """Measured cache bytes (total, per sequence, per token and fixed, per layer) beside the analytic ones."""
    model = mdef.merge(params)
    twice = jax.eval_shape(lambda: init_caches(model, batch, 2 * length, policy))
    info = model_info(cfg)
    layers, grow, fixed = [], 0, 0
    for block, c, c2 in zip(model.blocks, cache, twice):
        b1, b2 = tree_bytes(c), tree_bytes(c2)
        per_token, rem = divmod(b2 - b1, batch * length)
        if rem:  # not linear in the length (a cache shorter than a window): report the mean
            per_token = (b2 - b1) / (batch * length)
        state = b1 / batch - per_token * length
        state = int(state) if float(state).is_integer() else state
        grow, fixed = grow + per_token, fixed + state
        layers.append({"layer": block.label, "mixer": type(block.mixer).__name__, "bytes_per_token": per_token,
                       "state_bytes": state, "analytic_bytes_per_token": block.mixer.cache_bytes_per_token(),
                       "analytic_state_bytes": block.mixer.state_bytes(),
                       "arrays": {k: f"{jnp.dtype(v.dtype).name}{list(v.shape)}" for k, v in _named(c).items()}})
    total = tree_bytes(cache)
    out = {"cache_bytes": total, "bytes_per_sequence": total // batch if total % batch == 0 else total / batch, "bytes_per_token": grow, "state_bytes": fixed,
           "analytic_bytes_per_token": info["kv_cache_bytes_per_token"],
           "analytic_state_bytes": info["state_bytes_per_sequence"],
           "analytic_bytes_per_sequence": info["kv_cache_bytes_per_token"] * length + info["state_bytes_per_sequence"],
           "cache_dtype": info["kv_cache_dtype"], "layers": layers}
    out["matches_analytic"] = out["bytes_per_token"] == out["analytic_bytes_per_token"] and \
        out["state_bytes"] == out["analytic_state_bytes"]
    pruned = pruned_report(model, cache, length)
    if pruned:
        out["pruned"] = pruned
    return out


def _named(cache) -> dict:
    """Leaf name (path joined by '.') -> array, for the per-layer listing."""
    return {jax.tree_util.keystr(p, simple=True, separator="."): x
            for p, x in jax.tree_util.tree_flatten_with_path(cache)[0]}


def pruned_report(model, cache: list, length: int) -> dict | None:
    """What the pruned caches hold after decoding, per sequence (mean over the batch): the kept entries' key
    and value bytes against a dense cache of the same length and against the bytes allocated (every array of
    the cache), by pruned layer, with the slots allocated and keys evicted per KV head; None without pruned
    layers."""
    held = dense = allocated = evicted = 0.0
    by_layer = {}
    for block, c in zip(model.blocks, cache):
        if not pruned_cache.is_pruned(c):
            continue
        occ_BH = np.asarray(pruned_cache.occupancy(c), np.float64)
        layer_held = float(occ_BH.sum(axis=1).mean()) * pruned_cache.entry_bytes(c)
        held += layer_held
        dense += length * block.mixer.cache_bytes_per_token()
        allocated += tree_bytes(c) / occ_BH.shape[0]
        evicted += float(np.asarray(c["evicted"], np.float64).sum(axis=1).mean())
        by_layer[block.label] = {"entries_per_head": occ_BH.mean(axis=0).tolist(),
                                 "slots_per_head": sum(pruned_cache.slots_per_pair(c)),
                                 "evicted_per_head": np.asarray(c["evicted"], np.float64).mean(axis=0).tolist(),
                                 "held_kv_bytes": layer_held}
    if not by_layer:
        return None
    return {"held_kv_bytes_per_sequence": held, "dense_kv_bytes_per_sequence": dense,
            "allocated_bytes_per_sequence": allocated, "compression": dense / max(held, 1.0),
            "allocated_vs_dense": allocated / max(dense, 1.0), "evicted_per_sequence": evicted, "layers": by_layer}


def prompt_tokens(rng: np.random.Generator, batch: int, prompt: int, *, ids: np.ndarray,
                  text: np.ndarray | None) -> np.ndarray:
    """[batch, prompt] prompt tokens: held-out text at random offsets when there is enough, else random ids."""
    if text is not None and len(text) > prompt:
        starts = rng.integers(0, len(text) - prompt, batch)
        return np.stack([np.asarray(text[s:s + prompt], np.int32) for s in starts])
    return rng.choice(ids, (batch, prompt)).astype(np.int32)


def lines(res: dict) -> list[str]:
    """The human-readable report."""
    def n(x):
        return f"{int(x):,}" if float(x).is_integer() else f"{x:,.1f}"

    ok = "equal" if res["matches_analytic"] else "differ"
    out = [f"decode (batch {res['batch']}, prompt {res['prompt']} + {res['steps']} steps, cache of "
           f"{res['cache_tokens']} tokens, median of {res['repeats']}): {res['tokens_per_s']:,.0f} tokens/s, "
           f"{res['ms_per_step']:.3f} ms/step",
           f"  cache measured: {n(res['bytes_per_sequence'])} bytes/sequence = {n(res['bytes_per_token'])}/token + "
           f"{n(res['state_bytes'])} fixed; analytic (info, {res['cache_dtype']}): "
           f"{n(res['analytic_bytes_per_token'])}/token + {n(res['analytic_state_bytes'])} fixed ({ok})"]
    s = res.get("pruned")
    if s:
        out.append(f"  pruned caches: hold {n(s['held_kv_bytes_per_sequence'])} KV bytes/sequence of a dense "
                   f"{n(s['dense_kv_bytes_per_sequence'])} ({s['compression']:.2f}x smaller; allocated "
                   f"{n(s['allocated_bytes_per_sequence'])} with positions, scores and admission bits, "
                   f"{s['allocated_vs_dense']:.2f}x dense; {n(s['evicted_per_sequence'])} keys evicted)")
    return out
