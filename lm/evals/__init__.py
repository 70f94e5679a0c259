"""Evaluations of a trained run beyond its loss, the opt-in parts of `attnlab eval`:

- `recall`: associative recall (MQAR) accuracy at data.seq_len, by number of key-value pairs;
- `needle`: retrieval of a key -> value needle planted at several depths, by sequence length;
- `decode_speed`: decode tokens/s and the measured bytes of the real decode caches beside the analytic ones;
- `cache_policy`: loss, recall and bytes through pruned caches under a cache policy at a budget.

`common` holds what they share (the argmax predictor, the token pool, lengths past data.seq_len). `Request` is
what the command line asks for; `Request.check` refuses impossible flags before any run is loaded.
"""
from __future__ import annotations

import dataclasses

from lm.evals import cache_policy, decode_speed, needle, recall
from lm.evals.common import EvalError, positive
from lm.evals.decode_speed import DEFAULT_BATCH as _DECODE_BATCH, DEFAULT_REPEATS as _DECODE_REPEATS
from lm.evals.needle import DEFAULT_SAMPLES as _NEEDLE_SAMPLES, check_depths as _check_depths
from lm.evals.recall import DEFAULT_SAMPLES as _RECALL_SAMPLES

__all__ = ["Request", "EvalError", "recall", "needle", "decode_speed", "cache_policy"]


@dataclasses.dataclass(frozen=True)
class Request:
    """Which evaluations beyond loss to run and their settings (None: the evaluation's default)."""

    recall: bool = False
    recall_pairs: list[int] | None = None
    recall_samples: int = _RECALL_SAMPLES
    needle: bool = False
    needle_lengths: list[int] | None = None
    needle_depths: list[float] | None = None
    needle_samples: int = _NEEDLE_SAMPLES
    needle_filler: str | None = None
    slide: bool = False
    decode: bool = False
    decode_batch: int = _DECODE_BATCH
    decode_prompt: int | None = None
    decode_steps: int | None = None
    decode_repeats: int = _DECODE_REPEATS
    cache_policy: str | None = None
    cache_budget: int | None = None
    cache_window: int | None = None

    def any(self) -> bool:
        return self.recall or self.needle or self.decode

    def check(self) -> None:
        """EvalError for settings that are wrong whatever the run: counts below 1, depths outside [0, 1], a
        setting of an evaluation that was not asked for."""
        positive(recall_samples=self.recall_samples, needle_samples=self.needle_samples,
                 decode_batch=self.decode_batch, decode_prompt=self.decode_prompt, decode_steps=self.decode_steps,
                 decode_repeats=self.decode_repeats, cache_budget=self.cache_budget, cache_window=self.cache_window)
        for n in self.recall_pairs or ():
            positive(recall_pairs=n)
        for n in self.needle_lengths or ():
            positive(needle_lengths=n)
        if self.needle_depths:
            _check_depths(self.needle_depths)
        defaults = Request()
        for flag, owner in (("recall_pairs", "recall"), ("recall_samples", "recall"), ("needle_lengths", "needle"),
                            ("needle_depths", "needle"), ("needle_samples", "needle"), ("needle_filler", "needle"),
                            ("slide", "needle"), ("decode_batch", "decode"), ("decode_prompt", "decode"),
                            ("decode_steps", "decode"), ("decode_repeats", "decode"), ("cache_policy", "decode"),
                            ("cache_budget", "cache_policy"), ("cache_window", "cache_policy")):
            if getattr(self, flag) != getattr(defaults, flag) and not getattr(self, owner):
                need = owner.replace("_", "-")
                raise EvalError(f"--{flag.replace('_', '-')} is a setting of --{need}; add --{need}")
