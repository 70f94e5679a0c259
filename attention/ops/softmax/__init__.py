"""Softmax attention: the contract (`api.py`), the dense oracle (`reference.py`), the blocked jnp path
(`xla.py`) and the Pallas flash kernel (`pallas.py`); importing the package registers the implementations
with `attention.ops.dispatch`."""
from attention.ops.softmax import pallas, reference, xla  # noqa: F401  (registration)
from attention.ops.softmax.api import softmax_attention, softmax_decode

__all__ = ["softmax_attention", "softmax_decode"]
