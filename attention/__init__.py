"""Attention mixers (Flax NNX modules) and, in `attention.ops`, the pure-JAX ops beneath them.

`MIXERS` is the one place where a mixer kind registers its module and its config class; the model builds
layers from the names in `model.pattern`, and each module is checked against `attention.base.Mixer`
when it is registered. Adding a variant: one file (module + config), one line here, configs and tests.
"""
from __future__ import annotations

import dataclasses

from attention.base import MixerConfig, check_mixer
from attention.cca import CCAConfig, CCAttention
from attention.kda import KDAConfig, KimiDeltaAttention
from attention.lightning import LightningAttention, LightningConfig
from attention.softmax import SoftmaxAttention, SoftmaxConfig


@dataclasses.dataclass(frozen=True)
class MixerKind:
    module: type  # an nnx.Module implementing attention.base.Mixer, built as module(config, ctx, rngs=...)
    config: type[MixerConfig]

    def __post_init__(self):
        check_mixer(self.module)


MIXERS: dict[str, MixerKind] = {
    "softmax": MixerKind(SoftmaxAttention, SoftmaxConfig),
    "cca": MixerKind(CCAttention, CCAConfig),
    "kda": MixerKind(KimiDeltaAttention, KDAConfig),
    "lightning": MixerKind(LightningAttention, LightningConfig),
}

__all__ = ["MIXERS", "MixerKind"]
