"""Lightning attention: the contract (`api.py`), the token-by-token oracle (`reference.py`) and the
Lightning-2 blocked jnp path (`xla.py`); importing the package registers both with `attention.ops.dispatch`."""
from attention.ops.lightning import reference, xla  # noqa: F401  (registration)
from attention.ops.lightning.api import lightning

__all__ = ["lightning"]
