"""Synthetic recall tasks as batches of (tokens, loss_mask): no data files, a pure function of (seed, index).

Both tasks emit `tokens` [B, seq_len + 1] (the model reads tokens[:, :-1] and predicts tokens[:, 1:])
and `loss_mask` [B, seq_len] marking the targets that are scored: the answers only.

MQAR (multi-query associative recall, Zoology): `n_pairs` key-value pairs `k1 v1 k2 v2 ...` (keys drawn
without replacement from the lower half of the vocabulary, values from the upper half), then filler
tokens in which every key reappears once, at positions drawn with a power-law bias towards the start
(as in Zoology); the token after a queried key is its value, and predicting it is the only scored
target. Unlike Zoology's inputs, the value also appears as the next input token: with a single
`tokens` array the target at t is the input at t+1. Later queries ask for other keys, so this reveals
nothing they need.

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
               power_a: float = 0.01) -> dict[str, np.ndarray]:
    """One MQAR batch; deterministic in (seed, index)."""
    n_keys = (vocab_size - FIRST_TOKEN) // 2
    context = 2 * n_pairs
    query_span = seq_len + 1 - context
    if n_pairs > n_keys:
        raise ValueError(f"n_pairs {n_pairs} needs at least {2 * n_pairs + FIRST_TOKEN} token ids, vocab is {vocab_size}")
    if query_span < 2 * n_pairs:
        raise ValueError(f"seq_len {seq_len} leaves room for {query_span // 2} queries after {n_pairs} pairs; "
                         f"use seq_len >= {4 * n_pairs}")
    rng = _rng(seed, index)
    tokens = np.full((batch_size, seq_len + 1), PAD, np.int32)
    mask = np.zeros((batch_size, seq_len), bool)
    # Query slots are pairs of positions (key, value) in the query span; slot i starts at 2*i.
    n_slots = query_span // 2
    slot_p = (np.arange(1, n_slots + 1, dtype=np.float64)) ** (-power_a)  # Zoology's power-law gap bias
    slot_p /= slot_p.sum()
    for b in range(batch_size):
        keys = FIRST_TOKEN + rng.choice(n_keys, n_pairs, replace=False)
        values = FIRST_TOKEN + n_keys + rng.integers(0, n_keys, n_pairs)
        tokens[b, 0:context:2], tokens[b, 1:context:2] = keys, values
        slots = rng.choice(n_slots, n_pairs, replace=False, p=slot_p)
        order = rng.permutation(n_pairs)
        key_pos = context + 2 * slots
        tokens[b, key_pos] = keys[order]
        tokens[b, key_pos + 1] = values[order]
        mask[b, key_pos] = True  # target at t is tokens[t + 1]: the value after the queried key
    return {"tokens": tokens, "loss_mask": mask}


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
