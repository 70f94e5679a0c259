"""Needle retrieval: a random key -> value string planted at a depth of a long filler, the key asked again at the
end; a sequence counts when the model's argmax predicts every value token (teacher-forced).

A sequence of `length` tokens is

    filler[:at]  key value  filler[at:]  key value

with `at` = round(depth x filler length): depth 0.1 plants the needle near the start, 0.9 near the end. The key
and value are `key_tokens` and `value_tokens` ids drawn from the token pool's content ids; the filler is text
cut at random places of the run's held-out split or random pool ids. Only the last value's predictions are
scored: at the key's last token and at each value token but the last. Chance: (1/pool size)^value_tokens.

Past `data.seq_len` (see `common.length_mode`) the whole sequence runs at positions the model never trained
at ("extrapolate"), or with --slide only its last `data.seq_len` tokens ("slide", the widest window a sliding
generator keeps), so a needle further back is out of sight.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from lm.config import Config
from lm.data import DataError
from lm.evals.common import EvalError, Predict, TokenPool, can_run_past, length_mode

NEEDLE_SEED = 4_242
KEY_TOKENS = 4
VALUE_TOKENS = 4
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
DEFAULT_SAMPLES = 16
MIN_FILLER = 8  # filler tokens a sequence needs around its needle for a depth to mean anything


def min_length(key_tokens: int = KEY_TOKENS, value_tokens: int = VALUE_TOKENS) -> int:
    return 2 * (key_tokens + value_tokens) + MIN_FILLER


def resolve_lengths(cfg: Config, requested: list[int] | None, *, slide: bool, key_tokens: int = KEY_TOKENS,
                    value_tokens: int = VALUE_TOKENS) -> list[tuple[int, str]]:
    """(length, mode) to score: the requested lengths, each checked, or data.seq_len / 4, / 2, x 1 (those long
    enough for a needle) and x 2 when the model can run past data.seq_len (or with --slide)."""
    shortest = min_length(key_tokens, value_tokens)
    C = cfg.data.seq_len
    if requested:
        for L in requested:
            if L < shortest:
                raise EvalError(f"--needle-lengths {L} is too short: a needle sequence holds the key and value "
                                f"twice and {MIN_FILLER} filler tokens, at least {shortest} tokens")
        lengths = list(dict.fromkeys(requested))
    else:
        lengths = [L for L in dict.fromkeys((C // 4, C // 2, C)) if L >= shortest]
        if slide or can_run_past(cfg, 2 * C):
            lengths.append(2 * C)
        if not lengths:
            raise EvalError(f"data.seq_len={C} is too short for a needle sequence ({shortest} tokens)")
    return [(L, length_mode(cfg, L, slide=slide, what="--needle-lengths")) for L in lengths]


def check_depths(depths: list[float]) -> list[float]:
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise EvalError(f"--needle-depths must be fractions in [0, 1] (got {d}); e.g. 0.1 0.5 0.9")
    return list(dict.fromkeys(depths))


def filler_source(pool: TokenPool, kind: str | None) -> tuple[str, Callable]:
    """(kind, fill): fill(rng, n, m) -> [n, m] filler tokens. "text" (the default when the run has a token
    store) cuts held-out text at random offsets; "random" draws pool ids."""
    kind = kind or ("text" if pool.text is not None else "random")
    if kind == "random":
        ids = pool.content()
        return kind, lambda rng, n, m: rng.choice(ids, (n, m))
    if pool.text is None:
        raise EvalError("--needle-filler text needs a run trained on a token store; this run's data has no "
                        "held-out text, use --needle-filler random")
    text = pool.text

    def fill(rng, n, m):
        if len(text) <= m:
            raise DataError(f"the held-out split has {len(text)} tokens, too few to cut {m} filler tokens; use "
                            f"--needle-filler random or shorter --needle-lengths")
        starts = rng.integers(0, len(text) - m, n)
        return np.stack([np.asarray(text[s:s + m], np.int32) for s in starts])

    return kind, fill


def needle_sequences(rng: np.random.Generator, *, length: int, depth: float, samples: int, pool: TokenPool,
                     fill: Callable, key_tokens: int = KEY_TOKENS,
                     value_tokens: int = VALUE_TOKENS) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens [samples, length], values [samples, value_tokens], where the needle starts)."""
    hay_len = length - 2 * (key_tokens + value_tokens)
    hay = np.asarray(fill(rng, samples, hay_len), np.int32)
    keys = rng.choice(pool.content(), (samples, key_tokens)).astype(np.int32)
    values = rng.choice(pool.content(), (samples, value_tokens)).astype(np.int32)
    at = int(round(depth * hay_len))
    tokens = np.concatenate([hay[:, :at], keys, values, hay[:, at:], keys, values], axis=1)
    return tokens, values, at


def score_needle(predict_for: Callable[[int], Predict], *, lengths: list[tuple[int, str]], depths: list[float],
                 samples: int, pool: TokenPool, filler: str | None = None, seq_len: int | None = None,
                 key_tokens: int = KEY_TOKENS, value_tokens: int = VALUE_TOKENS) -> dict:
    """Accuracy per length and depth. `predict_for(length)` gives the predictor of sequences of that many
    tokens; "slide" lengths are scored on their last `seq_len` tokens."""
    kind, fill = filler_source(pool, filler)
    results = []
    for length, mode in lengths:
        window = seq_len if mode == "slide" else length
        predict = predict_for(window)
        by_depth = []
        for depth in depths:
            rng = np.random.default_rng([NEEDLE_SEED, length, int(round(depth * 1e6))])
            tokens, values, _ = needle_sequences(rng, length=length, depth=depth, samples=samples, pool=pool,
                                                 fill=fill, key_tokens=key_tokens, value_tokens=value_tokens)
            pred = predict(tokens[:, length - window:])
            got = pred[:, window - value_tokens - 1:window - 1] == values
            by_depth.append({"depth": depth, "accuracy": float(got.all(axis=1).mean()),
                             "token_accuracy": float(got.mean())})
        results.append({"length": length, "mode": mode, "accuracy": float(np.mean([d["accuracy"] for d in by_depth])),
                        "by_depth": by_depth})
    return {"key_tokens": key_tokens, "value_tokens": value_tokens, "filler": kind, "samples": samples,
            "seed": NEEDLE_SEED, "pool": pool.source, "chance": float(len(pool.content())) ** -value_tokens,
            "results": results}


def lines(res: dict) -> list[str]:
    """The human-readable report."""
    out = [f"needle ({res['key_tokens']}-token key -> {res['value_tokens']}-token value, {res['filler']} filler, "
           f"{res['samples']} sequences per depth; all value tokens right):"]
    for r in res["results"]:
        how = {"fits": "", "extrapolate": " (past data.seq_len: extrapolated)",
               "slide": " (past data.seq_len: last window only)"}[r["mode"]]
        depths = "  ".join(f"{d['depth']:.0%} {d['accuracy']:.3f}" for d in r["by_depth"])
        out.append(f"  {r['length']:>6} tokens{how}: {depths}  (mean {r['accuracy']:.3f})")
    return out
