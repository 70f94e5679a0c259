"""Kimi Delta Attention: the contract (`api.py`), the token-by-token oracle (`reference.py`) and the chunked
jnp path (`xla.py`); importing the package registers both implementations with `attention.ops.dispatch`."""
from attention.ops.kda import reference, xla  # noqa: F401  (registration)
from attention.ops.kda.api import kda

__all__ = ["kda"]
