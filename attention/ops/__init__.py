"""Pure-JAX attention ops, time-major [batch, time, heads, dim]; each takes impl=reference|xla|pallas|auto.

One folder per op (`softmax/`, `kda/`, `lightning/`): `api.py` is the contract (signature, argument checks,
dispatch), `reference.py` the obviously-correct oracle, `xla.py` the blocked/chunked jnp path, and
`pallas.py` the adapter that registers a kernel from `kernels_pallas/` where one exists. `dispatch.py` picks
an implementation per call and records the choice; `recurrent.py` holds the checks and helpers the two
linear recurrences share.
"""
from attention.ops.dispatch import ImplUnavailable, choices, clear_choices, label_calls
from attention.ops.kda import kda
from attention.ops.lightning import lightning
from attention.ops.softmax import softmax_attention, softmax_decode

__all__ = ["softmax_attention", "softmax_decode", "kda", "lightning", "ImplUnavailable", "choices",
           "clear_choices", "label_calls"]
