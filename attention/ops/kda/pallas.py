"""The chunked Pallas KDA kernels (`kernels_pallas.kda`) as the `pallas` implementation of `kda`: interpreted on
the CPU (what the tests check), Triton on GPU, Mosaic on TPU; forward and backward are kernels."""
from __future__ import annotations

import jax.numpy as jnp

from attention.ops import dispatch
from attention.ops.recurrent import doc_starts
from kernels_pallas.kda import kda_attention

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def supports(*, backend, dtype, **_):
    """None when the kernel serves the call, else why not."""
    if jnp.dtype(dtype) not in {jnp.dtype(d) for d in DTYPES}:
        return f"the kda kernel takes float32, bfloat16 or float16 inputs, not {jnp.dtype(dtype).name}"
    return None


@dispatch.register("kda", "pallas", supports=supports)
def kda_pallas(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
               chunk=None, interpret=None):
    """chunk overrides the kernel's chunk (tests); interpret=None interprets exactly on the CPU."""
    B, T = q.shape[:2]
    doc = None if segment_ids is None else jnp.cumsum(doc_starts(segment_ids, B, T), axis=1, dtype=jnp.int32)
    o, final = kda_attention(q, k, v, g, beta, scale=scale, initial_state=initial_state, doc_ids=doc, chunk=chunk,
                             interpret=interpret)
    return o, (final if output_final_state else None)
