"""Softmax attention: the contract (`api.py`), the dense oracle (`reference.py`) and the blocked jnp path
(`xla.py`); importing the package registers both implementations with `attention.ops.dispatch`."""
from attention.ops.softmax import reference, xla  # noqa: F401  (registration)
from attention.ops.softmax.api import softmax_attention, softmax_decode

__all__ = ["softmax_attention", "softmax_decode"]
