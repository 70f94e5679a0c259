"""What `softmax_attention(impl="auto")` runs, and why: a table of evidence per backend.

- Calls that only our kernel serves take it wherever it runs: the SP-KV gate (a per-key additive bias with the
  local-window exemption, which no library kernel has; ours also skips gate-closed tiles and, under a hard gate,
  attends to the compact blocks of kept keys), and one array as both key and value (read once).
- Every other call takes the first kernel of its backend's PREFERENCE that supports it (xla when none does); each
  entry says what it rests on, and the reason names the kernels that refused the call. Until the GPU suite
  (experiments/bench/gpu_suite.sh) measures them, the GPU and TPU rows rest on published and structural
  evidence, and say so.
"""
from __future__ import annotations

from attention.ops import dispatch

PREFERENCE = {
    "gpu": (
        ("cudnn", "published, unmeasured here: cuDNN's fused attention is FA3-class on Hopper, and our Triton kernel "
                  "FA2-class (experiments/results/flash_structure.md)"),
        ("pallas", "our Triton flash kernel: skips masked tiles"),
    ),
    "tpu": (
        ("splash", "published, unmeasured here: jax's splash attention, Mosaic-tuned by the jax team"),
        ("pallas", "our TPU pipeline: skips masked tiles, VMEM per step independent of T"),
    ),
}


def choose(*, backend, why_not, has_key_log_gate, kv_shared, **_) -> tuple[str, str]:
    """(implementation, reason) for one call; why_not maps each kernel implementation to None (it can run the
    call) or the reason it cannot."""
    if backend not in PREFERENCE:
        return "xla", dispatch.CPU_INTERPRETED
    ours = why_not.get("pallas") is None
    if ours and has_key_log_gate:
        return "pallas", "the SP-KV gate with its local window: only our kernel has it (and skips closed tiles)"
    if ours and kv_shared:
        return "pallas", "one array as key and value: only our kernel reads it once"
    refused = []
    for impl, evidence in PREFERENCE[backend]:
        reason = why_not.get(impl, f"no {impl} implementation is registered")
        if reason is None:
            return impl, "; ".join([evidence] + refused)
        refused.append(f"not {impl}: {reason}")
    return "xla", "; ".join(["no kernel serves this call"] + refused)


dispatch.register_auto("softmax_attention", choose)
