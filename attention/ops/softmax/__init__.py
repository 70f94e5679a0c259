"""Softmax attention: the contract (`api.py`), the dense oracle (`reference.py`), the blocked jnp path
(`xla.py`), the Pallas flash kernel (`pallas.py`), the library kernels cuDNN and splash (`library.py`) and auto's
table of evidence (`auto.py`); importing the package registers them with `attention.ops.dispatch`."""
from attention.ops.softmax import auto, library, pallas, reference, xla  # noqa: F401  (registration)
from attention.ops.softmax.api import softmax_attention, softmax_decode

__all__ = ["softmax_attention", "softmax_decode"]
