"""The chunked Pallas KDA kernels (`kernels_pallas.kda`) as the `pallas` implementation of `kda`: interpreted on
the CPU (what the tests check), Triton on GPU, Mosaic on TPU; forward and backward are kernels."""
from __future__ import annotations

from attention.ops import dispatch
from attention.ops.recurrent import chunk_kernel_supports, doc_index
from kernels_pallas.kda import kda_attention


@dispatch.register("kda", "pallas", supports=chunk_kernel_supports("kda"))
def kda_pallas(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
               chunk=None, interpret=None, drivers=None):
    """chunk overrides the kernel's chunk (tests); interpret=None interprets exactly on the CPU; drivers picks
    the kernels' drivers (tests: ("grid", "grid"), the accelerators' layout, also runs interpreted)."""
    B, T = q.shape[:2]
    doc = doc_index(segment_ids, B, T)
    o, final = kda_attention(q, k, v, g, beta, scale=scale, initial_state=initial_state, doc_ids=doc, chunk=chunk,
                             interpret=interpret, drivers=drivers)
    return o, (final if output_final_state else None)
