"""Associative recall (MQAR): key-value pairs, then queries of the keys; accuracy of the model's argmax at the
queried values.

Sequences come from the MQAR task generator (`lm.data.synthetic.tasks.mqar_batch`) with a fixed seed and
`data.seq_len` tokens, written in a token pool of the run's own vocabulary (`common.token_pool`): generator
id i is pool id `ids[i]`. For a byte-level model trained on text the pairs are characters it reads, so this
measures in-context copying; for a run trained on MQAR the pool is its task vocabulary and this is its task.
Chance is 1 / (number of value ids): a model that knows a value comes but not which.
"""
from __future__ import annotations

import numpy as np

from lm.data.synthetic.tasks import FIRST_TOKEN, mqar_batch
from lm.evals.common import EvalError, Predict, TokenPool

RECALL_SEED = 8_675_309
DEFAULT_PAIRS = (4, 8, 16, 32)
DEFAULT_SAMPLES = 64
POWER_A = 0.01  # the generator's (and Zoology's) query-gap bias


def n_value_ids(pool: TokenPool) -> int:
    """How many ids a value is drawn from (the generator splits the pool's ids past the first two in half)."""
    return (len(pool.ids) - FIRST_TOKEN) // 2


def check_pairs(n_pairs: int, *, seq_len: int, pool: TokenPool, power_a: float = POWER_A) -> None:
    """EvalError unless `n_pairs` pairs and their queries fit `seq_len` tokens and the pool (the generator's
    own rules, asked by generating one sequence)."""
    if n_pairs < 1:
        raise EvalError(f"--recall-pairs must be at least 1 (got {n_pairs})")
    try:
        mqar_batch(RECALL_SEED, 0, batch_size=1, seq_len=seq_len, n_pairs=n_pairs, vocab_size=len(pool.ids),
                   power_a=power_a)
    except ValueError as e:
        raise EvalError(f"--recall-pairs {n_pairs} does not fit the run (data.seq_len={seq_len}, a pool of "
                        f"{len(pool.ids)} token ids): {e}") from None


def resolve_pairs(requested: list[int] | None, *, seq_len: int, pool: TokenPool, power_a: float = POWER_A) -> list[int]:
    """The pair counts to score: the requested ones, each checked, or those of 4, 8, 16, 32 that fit."""
    if requested:
        for n in requested:
            check_pairs(n, seq_len=seq_len, pool=pool, power_a=power_a)
        return list(dict.fromkeys(requested))
    fit = []
    for n in DEFAULT_PAIRS:
        try:
            check_pairs(n, seq_len=seq_len, pool=pool, power_a=power_a)
            fit.append(n)
        except EvalError:
            pass
    if not fit:
        raise EvalError(f"no default --recall-pairs ({', '.join(map(str, DEFAULT_PAIRS))}) fits data.seq_len="
                        f"{seq_len} and a pool of {len(pool.ids)} ids; give --recall-pairs N with 4N <= {seq_len}")
    return fit


def recall_sequences(n_pairs: int, *, seq_len: int, samples: int, pool: TokenPool,
                     power_a: float = POWER_A) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [samples, seq_len + 1], targets [samples, seq_len], both in pool ids, scored-target mask
    [samples, seq_len]): the generator's batch 0 at the fixed seed, mapped into the pool."""
    batch = mqar_batch(RECALL_SEED, 0, batch_size=samples, seq_len=seq_len, n_pairs=n_pairs,
                       vocab_size=len(pool.ids), power_a=power_a)
    return pool.ids[batch["tokens"]], pool.ids[batch["targets"]], batch["loss_mask"]


def score_recall(predict: Predict, *, pairs: list[int], seq_len: int, samples: int, pool: TokenPool,
                 power_a: float = POWER_A) -> dict:
    """Accuracy of `predict` on the queried values, per number of pairs."""
    results = []
    for n in pairs:
        tokens, targets, mask = recall_sequences(n, seq_len=seq_len, samples=samples, pool=pool, power_a=power_a)
        pred = predict(tokens[:, :-1])
        correct = (pred == targets) & mask
        results.append({"n_pairs": n, "accuracy": float(correct.sum() / mask.sum()), "queries": int(mask.sum())})
    return {"task": "mqar", "seq_len": seq_len, "samples": samples, "seed": RECALL_SEED, "pool": pool.source,
            "chance": 1.0 / n_value_ids(pool), "results": results}


def lines(res: dict) -> list[str]:
    """The human-readable report."""
    per = ", ".join(f"{r['n_pairs']} pairs {r['accuracy']:.3f}" for r in res["results"])
    return [f"recall (MQAR, {res['seq_len']} tokens, {res['samples']} sequences each, chance {res['chance']:.3f}): "
            f"{per}", f"  tokens: {res['pool']}"]
