"""Attention mixers (Flax NNX modules) and, in `attention.ops`, the pure-JAX ops beneath them.

`MIXERS` maps a mixer kind to its module class and `MIXER_CONFIGS` to its config class; the model
builds layers from the names in `model.pattern`.
"""
from attention.softmax import SoftmaxAttention, SoftmaxConfig

MIXERS = {"softmax": SoftmaxAttention}
MIXER_CONFIGS = {"softmax": SoftmaxConfig}

__all__ = ["MIXERS", "MIXER_CONFIGS"]
