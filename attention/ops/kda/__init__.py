"""Kimi Delta Attention: the contract (`api.py`), the token-by-token oracle (`reference.py`), the chunked jnp
path (`xla.py`) and the Pallas forward kernel (`pallas.py`); importing the package registers them with
`attention.ops.dispatch`."""
from attention.ops.kda import pallas, reference, xla  # noqa: F401  (registration)
from attention.ops.kda.api import kda

__all__ = ["kda"]
