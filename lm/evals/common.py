"""What the evaluations beyond loss share: the error they raise, the next-token predictor of a run's model, the
pool of token ids their synthetic sequences are written in, and how a length past `data.seq_len` is run."""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lm.config import Config
from lm.data import DataError, StoreDataset
from lm.model import ModelDef
from lm.train.rundir import RunError

# tokens [B,T] -> the model's most likely next token at every position [B,T] (argmax of the logits)
Predict = Callable[[np.ndarray], np.ndarray]

# How much of the held-out split the token pool is counted over, the share of it a token needs to be in the
# pool, and the largest pool (a BPE vocabulary's rarest ids would only add tokens the model barely knows).
POOL_SAMPLE = 1_000_000
POOL_MIN_SHARE = 1e-5
POOL_MAX = 4096
POOL_MIN = 8


class EvalError(RunError):
    """An evaluation request that cannot be served as asked; the message says what to change."""


def predictor(mdef: ModelDef, params, rows: int, logits: Callable | None = None) -> Predict:
    """The argmax next-token predictor of a model, run `rows` sequences at a time (a last short chunk is padded
    so every call of one length has one shape: one compilation per length). `logits(model, tokens)` computes
    the logits (None: the full forward)."""
    logits = logits or (lambda model, t: model(t))
    fwd = jax.jit(lambda p, t: jnp.argmax(logits(mdef.merge(p), t), axis=-1).astype(jnp.int32))

    def predict(tokens_BT: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(tokens_BT), rows):
            chunk = np.asarray(tokens_BT[i:i + rows], np.int32)
            pad = rows - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), np.int32)])
            out.append(np.asarray(fwd(params, jnp.asarray(chunk)))[:rows - pad])
        return np.concatenate(out)

    return predict


def rows_for(batch_size: int, seq_len: int, length: int) -> int:
    """Sequences per call at `length` tokens: the eval batch's token count, at least one sequence."""
    return max(1, batch_size * seq_len // length)


@dataclasses.dataclass(frozen=True)
class TokenPool:
    """Token ids synthetic sequences are written in, all inside the model's vocabulary. `ids[0]` and `ids[1]` are
    the MQAR generator's filler and separator; keys, values and needles come from `ids[2:]`. `text` is the
    held-out split (token stores only), where text filler is cut from."""

    ids: np.ndarray
    source: str
    text: np.ndarray | None = None

    def content(self) -> np.ndarray:
        """The ids keys, values and random filler are drawn from."""
        return self.ids[2:]


def token_pool(cfg: Config, ds) -> TokenPool:
    """The pool of a run's data. A token store: its held-out split's tokens, most frequent first, those with a
    share of at least 1e-5 (at most 4096), so a byte-level model trained on text is asked to copy the
    characters it reads (the two most frequent, e.g. space and newline, are the MQAR filler and separator).
    A synthetic MQAR run: its task vocabulary as it trained on it (identity). Other synthetic tasks: every id of
    the model's vocabulary."""
    if isinstance(ds, StoreDataset):
        text = ds.store.split("val")
        sample = np.asarray(text[:POOL_SAMPLE], np.int64)
        counts = np.bincount(sample, minlength=cfg.model.vocab_size)
        order = np.argsort(-counts, kind="stable")
        keep = order[counts[order] >= max(1.0, POOL_MIN_SHARE * len(sample))][:POOL_MAX]
        if len(keep) < POOL_MIN:
            raise DataError(f"the held-out split of {ds.store.path} has {len(keep)} distinct tokens; the recall and "
                            f"needle evals need at least {POOL_MIN}")
        return TokenPool(keep.astype(np.int32), f"the {len(keep)} most frequent tokens of the held-out split",
                         np.asarray(text))
    if getattr(ds, "task", None) == "mqar":
        v = int(ds.settings["vocab_size"])
        return TokenPool(np.arange(v, dtype=np.int32), f"the run's MQAR vocabulary (ids 0..{v - 1}, as trained)")
    v = cfg.model.vocab_size
    return TokenPool(np.arange(v, dtype=np.int32), f"every id of the model's vocabulary (0..{v - 1})")


def can_run_past(cfg: Config, length: int) -> bool:
    """Whether the model can run `length` tokens at all: RoPE and NoPE at any length, learned positions up to
    the end of their table (model.max_seq_len)."""
    return cfg.model.pos != "learned" or length <= cfg.model.max_seq_len


def length_mode(cfg: Config, length: int, *, slide: bool, what: str) -> str:
    """How `length` tokens are run: "fits" (at most data.seq_len), "slide" (past it, with --slide: the last
    data.seq_len tokens only, the positions the model trained at) or "extrapolate" (past it, the whole sequence
    at positions it never trained at). EvalError when the model cannot run it: learned positions past their
    table without --slide. `what` names the request in the message."""
    C = cfg.data.seq_len
    if length <= C:
        return "fits"
    if slide:
        return "slide"
    if can_run_past(cfg, length):
        return "extrapolate"
    raise EvalError(f"{what} {length} is longer than the model's learned position table (model.max_seq_len="
                    f"{cfg.model.max_seq_len}; data.seq_len={C}); give at most {cfg.model.max_seq_len}, or --slide "
                    f"to score in a window of {C} tokens")


def positive(**values: int | None) -> None:
    """EvalError for a count that is given and below 1 (flags named as --a-b for a_b)."""
    for name, v in values.items():
        if v is not None and v < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be at least 1 (got {v})")
