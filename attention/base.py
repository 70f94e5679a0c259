"""What every mixer shares: its config base class and the context a mixer is built in.

A mixer is a Flax NNX module with one config class (a subclass of `MixerConfig`). It implements
`__call__(x, *, positions, segment_ids=None)`, `init_cache(batch, max_len, dtype)`,
`decode(x, cache, position)`, `cache_bytes_per_token()` (or `state_bytes()`) and `flops_per_token(seq_len)`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import pydantic


class MixerConfig(pydantic.BaseModel):
    """Base of every mixer's settings (`model.mixers.<name>` in a config file)."""

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True)

    kind: str

    def check(self, ctx: "MixerContext") -> list[str]:
        """Cross-field problems given the model around the mixer, as messages naming the key (without prefix)."""
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
