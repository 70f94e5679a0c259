"""Synthetic recall tasks as batches of (tokens, loss_mask): no data files, a pure function of (seed, index).

Both tasks emit `tokens` [B, seq_len + 1] (the model reads tokens[:, :-1] and predicts tokens[:, 1:], unless
the batch has `targets` [B, seq_len], which then replace tokens[:, 1:]) and `loss_mask` [B, seq_len] marking
the targets that are scored: the answers only.

MQAR (multi-query associative recall, Zoology's `multiquery_ar`): `n_pairs` key-value pairs `k1 v1 k2 v2 ...`
(keys and values drawn without replacement, keys from the lower half of the vocabulary, values from the upper
half), then a query span in which every key reappears once, at even offsets drawn with Zoology's power-law
bias towards the start of the span (offset slot i, 1-based, has probability proportional to i^(power_a - 1));
the rest of the span is random tokens (`noise`, Zoology's random_non_queries; else the filler id). With
`layout: random` the pairs are not at the start: the pairs and the queries take 2-token slots drawn uniformly
from the whole row, each key queried in a later slot than its pair (power_a shapes the start layout only), so a
cache that keeps the first tokens of a row has no advantage over one that keeps any others. Noise never
repeats one of the row's keys: at Zoology's vocabulary of 8192 that is rare, at our CPU-scale vocabularies
(64-512) it would put several false copies of each key in a sequence. Predicting
the value at a queried key is the only scored target. The value is *not* the next input token: MQAR batches
carry `targets` [B, seq_len] beside `tokens`, and the input after a query is noise, as in Zoology. (Writing the
value into the input would leak the answers: since every key is queried once, a model could name the last
query's value by elimination from the values already shown, and earlier ones with rising odds.)

Selective copy (Mamba, Gu & Dao): `n_tokens` data tokens scattered at random positions of a
`n_tokens + n_noise` prefix of blank (noise) tokens, a separator, then the data tokens again in order;
only the copied tokens after the separator are scored.
"""
from __future__ import annotations

import numpy as np

PAD, SEP = 0, 1
FIRST_TOKEN = 2  # ids 0 and 1 are filler and separator


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def mqar_batch(seed: int, index: int, *, batch_size: int, seq_len: int, n_pairs: int, vocab_size: int,
               power_a: float = 0.01, noise: bool = True, layout: str = "start") -> dict[str, np.ndarray]:
    """One MQAR batch; deterministic in (seed, index)."""
    if layout not in ("start", "random"):
        raise ValueError(f"layout {layout!r}: start (the pairs first, Zoology's) or random (pairs anywhere)")
    if layout == "random" and power_a != 0.01:
        raise ValueError("power_a shapes the query gaps of layout start; layout random draws every slot uniformly")
    n_keys = (vocab_size - FIRST_TOKEN) // 2
    context = 2 * n_pairs
    query_span = seq_len + 1 - context
    if n_pairs > n_keys:
        raise ValueError(f"n_pairs {n_pairs} needs at least {2 * n_pairs + FIRST_TOKEN} token ids, vocab is {vocab_size}")
    if query_span < 2 * n_pairs:
        raise ValueError(f"seq_len {seq_len} leaves room for {query_span // 2} queries after {n_pairs} pairs; "
                         f"use seq_len >= {4 * n_pairs}")
    if not 0 < power_a <= 1:
        raise ValueError(f"power_a {power_a} must be in (0, 1] (1 is uniform, Zoology's default 0.01 favours "
                         f"queries soon after the pairs)")
    rng = _rng(seed, index)
    tokens = np.full((batch_size, seq_len + 1), PAD, np.int32)
    mask = np.zeros((batch_size, seq_len), bool)
    answers = np.zeros((batch_size, seq_len), np.int32)
    # Query slots are even offsets of the query span; slot i (0-based) starts at context + 2 * i.
    n_slots = query_span // 2
    slot_p = np.arange(1, n_slots + 1, dtype=np.float64) ** (power_a - 1.0)  # Zoology's power law
    slot_p /= slot_p.sum()
    for b in range(batch_size):
        keys = FIRST_TOKEN + rng.choice(n_keys, n_pairs, replace=False)
        values = FIRST_TOKEN + n_keys + rng.choice(n_keys, n_pairs, replace=False)
        if noise:  # any id but this row's keys, so that a query's key occurs only at its pair and its query
            others = np.setdiff1d(np.arange(FIRST_TOKEN, vocab_size), keys)
            tokens[b] = rng.choice(others, seq_len + 1)
        if layout == "random":  # 2n slots anywhere, paired at random: the earlier slot of each couple holds the pair
            couples = np.sort(rng.choice((seq_len + 1) // 2, (n_pairs, 2), replace=False), axis=1)
            pair_pos, key_pos = 2 * couples[:, 0], 2 * couples[:, 1]
            tokens[b, pair_pos], tokens[b, pair_pos + 1] = keys, values
            tokens[b, key_pos], answers[b, key_pos], mask[b, key_pos] = keys, values, True
            continue
        tokens[b, 0:context:2], tokens[b, 1:context:2] = keys, values
        slots = rng.choice(n_slots, n_pairs, replace=False, p=slot_p)
        order = rng.permutation(n_pairs)
        key_pos = context + 2 * slots
        tokens[b, key_pos] = keys[order]
        answers[b, key_pos] = values[order]
        mask[b, key_pos] = True
    targets = np.where(mask, answers, tokens[:, 1:])  # elsewhere (unscored) the next input, as for text
    return {"tokens": tokens, "targets": targets, "loss_mask": mask}


def selective_copy_batch(seed: int, index: int, *, batch_size: int, seq_len: int, n_tokens: int,
                         vocab_size: int) -> dict[str, np.ndarray]:
    """One selective-copy batch: prefix of length seq_len - n_tokens, separator, the data tokens again."""
    prefix = seq_len - n_tokens  # the separator is the last prefix token; copies fill the rest
    if prefix - 1 < n_tokens:
        raise ValueError(f"seq_len {seq_len} is too short to scatter and copy {n_tokens} tokens; "
                         f"use seq_len >= {2 * n_tokens + 1}")
    if vocab_size - FIRST_TOKEN < 1:
        raise ValueError(f"vocab_size {vocab_size} leaves no data token ids")
    rng = _rng(seed, index)
    tokens = np.full((batch_size, seq_len + 1), PAD, np.int32)
    mask = np.zeros((batch_size, seq_len), bool)
    for b in range(batch_size):
        data = FIRST_TOKEN + rng.integers(0, vocab_size - FIRST_TOKEN, n_tokens)
        where = np.sort(rng.choice(prefix - 1, n_tokens, replace=False))
        tokens[b, where] = data
        tokens[b, prefix - 1] = SEP
        tokens[b, prefix:prefix + n_tokens] = data
        mask[b, prefix - 1:prefix - 1 + n_tokens] = True
    return {"tokens": tokens, "loss_mask": mask}


TASKS = {"mqar": mqar_batch, "selective_copy": selective_copy_batch}
