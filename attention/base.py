"""What every mixer shares: its config base class, the context a mixer is built in, and the two channels
between a mixer and the train step.

A mixer is a Flax NNX module with one config class (a subclass of `MixerConfig`). It implements
`__call__(x, *, positions, segment_ids=None)`, `init_cache(batch, max_len, dtype)`,
`decode(x, cache, position)`, `cache_bytes_per_token()` (or `state_bytes()`) and `flops_per_token(seq_len)`.

Beyond its output, a mixer may exchange two things with the training loop without widening that protocol
(so mixers that need neither ignore them):

- Into the mixer: `current_train_step()` is the optimizer step being computed while a train step is traced
  (`in_train_step`), and None everywhere else (eval, generation, a mixer called on its own). A mixer whose
  training follows a schedule reads it; None means inference semantics.
- Out of the mixer: `self.sow(AuxLoss, name, scalar)` adds a term, already weighted, to the training
  objective (per scored token, like the mean loss it joins); `self.sow(Stat, name, sum)` reports a
  statistic as a sum over the call's tokens, so the model can add it up over eval batches. The model
  collects both after each call (`lm.model.pop_sown`).

Parameters may carry, besides `axes`, `decay` and `lr_mult`, `frozen_last_steps=N`: in the last N steps
of the run the train step gives them neither a gradient nor an optimizer update (weight decay included).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Iterator

import pydantic
from flax import nnx


class MixerConfig(pydantic.BaseModel):
    """Base of every mixer's settings (`model.mixers.<name>` in a config file)."""

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True)

    kind: str

    def check(self, ctx: MixerContext) -> list[str]:
        """Cross-field problems given the model around the mixer, as messages naming the key (without prefix)."""
        return []



class HeadsMixerConfig(MixerConfig):
    """A mixer config with `n_heads` equal heads of `head_dim` (None: d_model // n_heads); the subclass
    declares both fields with its own defaults and documentation."""

    def dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def check(self, ctx: MixerContext) -> list[str]:
        if self.head_dim is None and ctx.d_model % self.n_heads:
            return [f"n_heads: d_model {ctx.d_model} is not divisible by n_heads {self.n_heads} (or set head_dim)"]
        return []

@dataclasses.dataclass(frozen=True)
class MixerContext:
    """Model-level settings a mixer needs, resolved for one layer."""

    d_model: int
    n_layers: int
    layer_idx: int
    seq_len: int
    pos: str  # "rope" | "learned" | "none": the model's positional scheme
    rope_theta: float
    bias: bool
    norm_eps: float
    init_std: float
    out_std: float  # init std of projections that write into the residual stream
    dtype: Any  # compute dtype (jnp.float32 / jnp.bfloat16)
    impl: str  # kernels.impl
    train_steps: int | None = None  # train.steps, for settings that name a part of the run


class AuxLoss(nnx.Intermediate):
    """A weighted scalar a mixer adds to the training objective."""


class Stat(nnx.Intermediate):
    """A statistic a mixer reports, as a sum over the tokens of one call; never differentiated."""


@dataclasses.dataclass(frozen=True)
class TrainStep:
    step: Any  # int32 scalar, traced under jit: 0-based index of the optimizer step being computed
    total: int  # train.steps


_TRAIN_STEP: contextvars.ContextVar[TrainStep | None] = contextvars.ContextVar("train_step", default=None)


@contextlib.contextmanager
def in_train_step(step: Any, total: int) -> Iterator[None]:
    """Mixers called inside see `current_train_step() == TrainStep(step, total)`."""
    token = _TRAIN_STEP.set(TrainStep(step, total))
    try:
        yield
    finally:
        _TRAIN_STEP.reset(token)


def current_train_step() -> TrainStep | None:
    return _TRAIN_STEP.get()


def visible_keys_per_query(seq_len: int, window: int | None) -> float:
    """Mean number of keys a causal query attends to (exact, so causal counts about half of T)."""
    T = seq_len
    if window is None or window >= T:
        return (T + 1) / 2
    full = window * (window + 1) / 2 + (T - window) * window
    return full / T
