"""The chunked Pallas lightning kernel (`kernels_pallas.lightning`) as the `pallas` implementation of `lightning`:
interpreted on the CPU (what the tests check), Triton on GPU, Mosaic on TPU."""
from __future__ import annotations

from attention.ops import dispatch
from attention.ops.recurrent import chunk_kernel_supports, doc_index
from kernels_pallas.lightning import lightning_attention


@dispatch.register("lightning", "pallas", supports=chunk_kernel_supports("lightning"))
def lightning_pallas(q, k, v, log_decay, *, scale=None, initial_state=None, output_final_state=False,
                     segment_ids=None, chunk=None, interpret=None, drivers=None):
    """chunk overrides the kernel's per-target chunk (tests); interpret=None interprets exactly on the CPU;
    drivers picks the kernels' drivers (tests: ("grid", "grid"), the accelerators' layout, also runs interpreted)."""
    B, T = q.shape[:2]
    doc = doc_index(segment_ids, B, T)
    o, final = lightning_attention(q, k, v, log_decay, scale=scale, initial_state=initial_state, doc_ids=doc,
                                   chunk=chunk, interpret=interpret, drivers=drivers)
    return o, (final if output_final_state else None)
