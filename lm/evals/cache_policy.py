"""A run decoded through pruned caches under a cache policy at a budget (`attention.cache_policies`): what
`attnlab eval RUN --decode --cache-policy P --cache-budget B` adds under the record's key `cache`.

Every held-out batch the eval scores runs token by token through the real caches (`lm.generate.init_caches`):
each softmax layer that reads the whole context holds at most B keys per sequence and KV head (its window and a
store the policy fills); linear mixers and sliding windows keep their own state. Its next-token loss and accuracy
are reported beside the full forward's on the same batches (`loss_delta`: cache minus full, paired token by
token), so a policy is judged at equal cache by what it costs. With `--recall`, associative recall is scored
through the caches too. Bytes: the keys and values the caches hold at the end of a sequence, what they allocate,
against a dense cache of the same length, and the keys a full store evicted (means over sequences).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attention import pruned_cache
from attention.cache_policies import CachePolicy, CachePolicyError
from lm.config import Config
from lm.evals import common, decode_speed
from lm.evals.common import EvalError
from lm.generate import GenerationError, init_caches, prefill
from lm.model import ModelDef, abstract_model, token_losses
from lm.train.step import batch_targets, target_mask


def resolve(cfg: Config, name: str, budget: int | None, window: int | None) -> CachePolicy:
    """The policy a request names, checked against every layer of the run's model (EvalError naming the layer
    and the fix when it cannot run)."""
    try:
        policy = CachePolicy(name, budget=budget, window=window)
    except CachePolicyError as e:
        raise EvalError(f"--cache-policy {name}: {e} (--cache-budget B)") from None
    if cfg.data.packed:
        raise EvalError("--cache-policy decodes each held-out row as one sequence, and this run packs documents "
                        "(data.packed: true); evaluate with --set data.packed=false")
    mdef, shapes = abstract_model(cfg)
    try:
        jax.eval_shape(lambda p: init_caches(mdef.merge(p), 1, cfg.data.seq_len, policy), shapes)
    except GenerationError as e:
        raise EvalError(f"--cache-policy {name}: {e}") from None
    return policy


def layer_slots(mdef: ModelDef, params, policy: CachePolicy, length: int) -> dict:
    """{layer label: {"window", "store"}} slots per KV head of each layer under the policy (the store: the pool's
    slots per (sequence, KV head) pair, its share of the budget rounded up to whole pages)."""
    caches = jax.eval_shape(lambda p: init_caches(mdef.merge(p), 1, length, policy), params)
    return {block.label: dict(zip(("window", "store"), pruned_cache.slots_per_pair(c)))
            for block, c in zip(mdef.merge(params).blocks, caches) if pruned_cache.is_pruned(c)}


def decoded_logits(model, tokens_BT: jax.Array, policy: CachePolicy) -> tuple[jax.Array, list]:
    """(logits [B,T,V], caches after the last token) of tokens fed one by one through caches under `policy`."""
    B, T = tokens_BT.shape
    caches, logits_TBV = prefill(model, tokens_BT, init_caches(model, B, T, policy))
    return jnp.swapaxes(logits_TBV, 0, 1), caches


def score(mdef: ModelDef, params, policy: CachePolicy, batches: list[dict], full: dict) -> dict:
    """Loss, accuracy and cache bytes through the caches over `batches` (those the eval scored, whose full-forward
    record is `full`)."""

    @jax.jit
    def run(params, batch):
        model = mdef.merge(params)
        logits, caches = decoded_logits(model, batch["tokens"][:, :-1], policy)
        targets = batch_targets(batch)
        mask = target_mask(batch, targets.shape)
        loss = jnp.sum(jnp.where(mask, token_losses(logits, targets), 0.0))
        correct = jnp.sum((jnp.argmax(logits, -1) == targets) & mask)
        return loss, jnp.sum(mask), correct, caches

    total = count = correct = 0.0
    reports = []
    for b in batches:
        batch = {k: jnp.asarray(v) for k, v in b.items()}
        loss, n, c, caches = run(params, batch)
        total, count, correct = total + float(loss), count + float(n), correct + float(c)
        reports.append(decode_speed.pruned_report(mdef.merge(params), jax.device_get(caches),
                                                  batch["tokens"].shape[1] - 1))
    loss = total / max(count, 1.0)
    held = {key: float(np.mean([r[key] for r in reports])) for key in
            ("held_kv_bytes_per_sequence", "dense_kv_bytes_per_sequence", "allocated_bytes_per_sequence",
             "evicted_per_sequence")}
    return {"policy": policy.name, "budget": policy.budget, "layers": layer_slots(mdef, params, policy,
                                                                                  batches[0]["tokens"].shape[1] - 1),
            "loss": loss, "accuracy": correct / max(count, 1.0), "tokens": int(count),
            "full_loss": full["eval_loss"], "loss_delta": loss - full["eval_loss"], **held}


def predictor(mdef: ModelDef, params, rows: int, policy: CachePolicy) -> common.Predict:
    """The argmax next-token predictor decoding through caches under `policy`."""
    return common.predictor(mdef, params, rows, logits=lambda model, t: decoded_logits(model, t, policy)[0])


def lines(res: dict) -> list[str]:
    def n(x):
        return f"{x:,.0f}"

    budget = "its configured capacity" if res["budget"] is None else f"{res['budget']} keys per layer and KV head"
    out = [f"cache policy {res['policy']} at {budget}: loss {res['loss']:.4f} nats/token through the caches, "
           f"{res['loss_delta']:+.4f} against the full forward on the same {res['tokens']:,} tokens; accuracy "
           f"{res['accuracy']:.4f}",
           f"  holds {n(res['held_kv_bytes_per_sequence'])} KV bytes/sequence of a dense "
           f"{n(res['dense_kv_bytes_per_sequence'])} (allocated {n(res['allocated_bytes_per_sequence'])}); "
           f"{res['evicted_per_sequence']:,.1f} keys evicted per sequence"]
    for r in (res.get("recall") or {}).get("results", []):
        out.append(f"  recall through the caches, {r['n_pairs']} pairs: {r['accuracy']:.3f}")
    return out
