"""Attention mixers (Flax NNX modules) and, in `attention.ops`, the pure-JAX ops beneath them.

`MIXERS` maps a mixer kind to its module class and `MIXER_CONFIGS` to its config class; the model
builds layers from the names in `model.pattern`.
"""
from attention.cca import CCAConfig, CCAttention
from attention.kda import KdaConfig, KimiDeltaAttention
from attention.lightning import LightningAttention, LightningConfig
from attention.softmax import SoftmaxAttention, SoftmaxConfig

MIXERS = {"softmax": SoftmaxAttention, "kda": KimiDeltaAttention, "lightning": LightningAttention,
          "cca": CCAttention}
MIXER_CONFIGS = {"softmax": SoftmaxConfig, "kda": KdaConfig, "lightning": LightningConfig,
                 "cca": CCAConfig}

__all__ = ["MIXERS", "MIXER_CONFIGS"]
