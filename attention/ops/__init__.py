"""Pure-JAX attention ops, time-major [batch, time, heads, dim]; each takes impl=reference|xla|pallas|auto."""
from attention.ops.dispatch import ImplUnavailable, choices, clear_choices, label_calls
from attention.ops.kda import kda
from attention.ops.lightning import lightning
from attention.ops.softmax import softmax_attention

__all__ = ["softmax_attention", "kda", "lightning", "ImplUnavailable", "choices", "clear_choices", "label_calls"]
