"""Lightning attention: the contract (`api.py`), the token-by-token oracle (`reference.py`), the Lightning-2
blocked jnp path (`xla.py`) and the chunked Pallas kernel (`pallas.py`); importing the package registers them
with `attention.ops.dispatch`."""
from attention.ops.lightning import pallas, reference, xla  # noqa: F401  (registration)
from attention.ops.lightning.api import lightning

__all__ = ["lightning"]
