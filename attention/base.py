"""What every mixer shares: the mixer protocol, its config base class, the context a mixer is built in,
and the channels between a mixer and the train step.

A mixer is a Flax NNX module with one config class (a subclass of `MixerConfig`), registered under its
kind in `attention.MIXERS`. `Mixer` below is the protocol, checked when the model builds a layer
(`check_mixer`): training/prefill `__call__`, incremental `init_cache`/`decode`, the analytic costs
`cache_bytes_per_token`, `state_bytes` and `flops_per_token`, `schedule_values` (where a training schedule stands,
logged with the step's metrics) and `stat_reporters`.

Beyond its output, a mixer exchanges three things with the training loop, none of which names a mixer
kind (so mixers that need none of them ignore them):

- Into the mixer: `current_train_step()` is the optimizer step being computed while a train step is traced
  (`in_train_step`), and None everywhere else (eval, generation, a mixer called on its own). A mixer whose
  training follows a schedule reads it; None means inference semantics.
- Out of the mixer: `self.sow(AuxLoss, name, scalar)` adds a term, already weighted, to the training
  objective (per scored token, like the mean loss it joins); `self.sow(Stat, name, sum)` reports a
  statistic as a sum over the call's tokens, so the model can add it up over eval batches. The model
  collects both after each call (`lm.model.pop_sown`).
- Back to the user: the mixer class's `stat_reporters` turn the Stat sums of an eval, by layer label, into a
  `StatsReport`: metrics for the eval record, heatmaps to save and log, and a clause for the eval line.

Parameters may carry, besides `axes`, `decay` and `lr_mult`, `frozen_last_steps=N`: in the last N steps
of the run the train step gives them neither a gradient nor an optimizer update (weight decay included).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
from typing import Any, Callable, ClassVar, Iterator, Protocol, runtime_checkable

import jax
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


@dataclasses.dataclass(frozen=True)
class Heatmap:
    """Values in [0, 1] by row label (a layer) and column (a head), to save as a PNG and log."""

    rows: dict[str, list[float]]
    title: str
    xlabel: str


@dataclasses.dataclass
class StatsReport:
    """What a mixer's eval statistics amount to."""

    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)  # entries of the eval record
    heatmaps: dict[str, Heatmap] = dataclasses.field(default_factory=dict)  # name -> heatmap
    summary: list[str] = dataclasses.field(default_factory=list)  # clauses for the one-line eval summary

    def merge(self, other: StatsReport) -> StatsReport:
        return StatsReport({**self.metrics, **other.metrics}, {**self.heatmaps, **other.heatmaps},
                           self.summary + other.summary)


# stats by block label, each a dict of Stat name -> sum over the eval's tokens
StatsByLayer = dict[str, dict[str, Any]]


@runtime_checkable
class Mixer(Protocol):
    """The interface every mixer module implements (see the module docstring)."""

    # Functions StatsByLayer -> StatsReport; a model calls each distinct one once per eval.
    stat_reporters: ClassVar[tuple[Callable[[StatsByLayer], StatsReport], ...]]

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """x [B,T,D] -> y [B,T,D]: training and prefill."""

    def init_cache(self, batch: int, max_len: int, dtype: Any) -> dict:
        """The empty decode cache (KV cache, recurrent state, conv windows) for `max_len` tokens."""

    def decode(self, x: jax.Array, cache: dict, position: jax.Array) -> tuple[jax.Array, dict]:
        """One token x [B,1,D] at `position` -> (y [B,1,D], new cache); token by token it reproduces __call__."""

    def cache_bytes_per_token(self, dtype_bytes: int | None = None) -> int:
        """Bytes the decode cache grows by per token (0 for constant-state mixers)."""

    def state_bytes(self) -> int:
        """Bytes of the decode state that does not grow with the sequence (0 for a plain KV cache)."""

    def flops_per_token(self, seq_len: int) -> float:
        """Analytic forward FLOPs per token at sequence length seq_len."""

    def schedule_values(self, step: int, total: int) -> dict[str, float]:
        """Where the mixer's training schedule stands at 0-based step `step` of `total` (logged with the step's
        metrics; e.g. SP-KV's gate ramp), {} for a mixer without one."""


def check_mixer(cls: type) -> None:
    """Raise TypeError naming what `cls` lacks of the `Mixer` protocol: a member, a keyword argument the
    model passes by name, or room for the positional arguments it passes."""
    missing = [name for name in ("stat_reporters", *_PROTOCOL_METHODS) if not hasattr(cls, name)]
    if missing:
        raise TypeError(f"mixer {cls.__name__} does not implement {', '.join(missing)} of attention.base.Mixer")
    for name, (n_positional, keywords) in _PROTOCOL_METHODS.items():
        params = list(inspect.signature(getattr(cls, name)).parameters.values())[1:]
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        lacking = [k for k in keywords if k not in {p.name for p in params}]
        if len(positional) < n_positional or lacking:
            raise TypeError(f"mixer {cls.__name__}.{name}{inspect.signature(getattr(cls, name))} does not match "
                            f"attention.base.Mixer.{name}{inspect.signature(getattr(Mixer, name))}")


def _arguments(fn) -> tuple[int, list[str]]:
    params = list(inspect.signature(fn).parameters.values())[1:]
    return (sum(p.kind == p.POSITIONAL_OR_KEYWORD for p in params),
            [p.name for p in params if p.kind == p.KEYWORD_ONLY])


# name -> (positional arguments the model passes, keyword arguments it passes by name)
_PROTOCOL_METHODS = {name: _arguments(getattr(Mixer, name))
                     for name in ("__call__", "init_cache", "decode", "cache_bytes_per_token", "state_bytes",
                                  "flops_per_token", "schedule_values")}
