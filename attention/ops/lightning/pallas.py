"""The chunked Pallas lightning kernel (`kernels_pallas.lightning`) as the `pallas` implementation of `lightning`:
interpreted on the CPU (what the tests check), Triton on GPU, Mosaic on TPU."""
from __future__ import annotations

import jax.numpy as jnp

from attention.ops import dispatch
from attention.ops.recurrent import doc_starts
from kernels_pallas.lightning import lightning_attention

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def supports(*, backend, dtype, **_):
    """None when the kernel serves the call, else why not."""
    if jnp.dtype(dtype) not in {jnp.dtype(d) for d in DTYPES}:
        return f"the lightning kernel takes float32, bfloat16 or float16 inputs, not {jnp.dtype(dtype).name}"
    return None


@dispatch.register("lightning", "pallas", supports=supports)
def lightning_pallas(q, k, v, log_decay, *, scale=None, initial_state=None, output_final_state=False,
                     segment_ids=None, chunk=None, interpret=None):
    """chunk overrides the kernel's per-target chunk (tests); interpret=None interprets exactly on the CPU."""
    B, T = q.shape[:2]
    doc = None if segment_ids is None else jnp.cumsum(doc_starts(segment_ids, B, T), axis=1, dtype=jnp.int32)
    o, final = lightning_attention(q, k, v, log_decay, scale=scale, initial_state=initial_state, doc_ids=doc,
                                   chunk=chunk, interpret=interpret)
    return o, (final if output_final_state else None)
