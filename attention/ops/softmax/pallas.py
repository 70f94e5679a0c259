"""The Pallas flash-attention kernels (`kernels_pallas.flash`) as the `pallas` implementations of
`softmax_attention` and `softmax_decode`: on the CPU they run in interpret mode (what the tests check), on GPU
Triton compiles them and on TPU Mosaic. One array passed as both k and v (`v is k`) is read once per tile by the kernel,
which returns dk + dv as k's gradient; in decode, a K=V cache is read once."""
from __future__ import annotations

import jax.numpy as jnp

from attention.ops import dispatch
from attention.ops.softmax.api import documents
from kernels_pallas.flash import KeyTransform, PagedKV, flash_attention, flash_decode

supports = dispatch.float_inputs("flash")


def supports_decode(*, backend, dtype, k_shape, v_shape, page_size=None, **info):
    """The decode kernel reads the cache in place, so it cannot pad head dims or pages: on a GPU (Triton) head
    dims and a paged store's page size must be powers of two of at least 16."""
    why = supports(backend=backend, dtype=dtype, **info)
    if why is None and backend == "gpu":
        bad = [d for d in (k_shape[-1], v_shape[-1]) if d < 16 or d & (d - 1)]
        if bad:
            why = (f"the decode kernel reads the cache in place and Triton needs power-of-two head dims >= 16; "
                   f"got {k_shape[-1]} (keys) and {v_shape[-1]} (values)")
        elif page_size is not None and (page_size < 16 or page_size & (page_size - 1)):
            why = (f"the decode kernel reads each page in place and Triton needs a power-of-two page >= 16; got "
                   f"{page_size}")
    return why


@dispatch.register("softmax_attention", "pallas", supports=supports)
def softmax_attention_pallas(q, k, v, *, causal=True, sliding_window=None, local_window=None,
                             key_log_gate=None, segment_ids=None, scale=None, block_q=None, block_k=None,
                             interpret=None, driver=None):
    """block_q / block_k override the kernel's per-target tiles (tests use small ones); interpret=None
    interprets exactly on the CPU; driver='pipeline' runs the TPU pipeline elsewhere (tests, interpreted)."""
    return flash_attention(q, k, None if v is k else v, causal=causal, sliding_window=sliding_window,
                           local_window=local_window, key_log_gate=key_log_gate,
                           doc_ids=None if segment_ids is None else documents(segment_ids), scale=scale,
                           block_q=block_q, block_k=block_k, interpret=interpret, driver=driver)


@dispatch.register("softmax_decode", "pallas", supports=supports_decode)
def softmax_decode_pallas(q, k, v, valid=None, *, lengths=None, key_log_gate=None, scale=None, key_norm_scale=None,
                          key_norm_eps=1e-5, key_rope_theta=None, key_positions=None, pages=None, block_k=None,
                          splits=None, heads_per_block=None, prefetch=None, interpret=None):
    """The cache is read in place ([B,S,Hkv,D], its own dtype), each head up to its length; holes and the gate
    become one additive fp32 bias per key and head (none when there are neither); derived keys (norm, RoPE)
    are made per tile inside the kernel, so a K=V cache is read once. A paged store is read in place too, page by
    page through its table. block_k / splits / heads_per_block / prefetch override the kernel's choices (tests)."""
    bias = None
    if valid is not None or key_log_gate is not None:
        gate = jnp.zeros(k.shape[:3], jnp.float32) if key_log_gate is None else key_log_gate.astype(jnp.float32)
        bias = gate if valid is None else jnp.where(valid, gate, -jnp.inf)
    transform = None
    if key_norm_scale is not None or key_rope_theta is not None:
        transform = KeyTransform(norm_eps=None if key_norm_scale is None else float(key_norm_eps),
                                 rope_theta=None if key_rope_theta is None else float(key_rope_theta))
    paged = None if pages is None else PagedKV(
        pages.k, None if pages.v is pages.k else pages.v, pages.table, pages.lengths, pages.positions,
        None if pages.key_log_gate is None else pages.key_log_gate.astype(jnp.float32))
    return flash_decode(q, k, None if v is k else v, bias, lengths=lengths, scale=scale, key_transform=transform,
                        key_norm_scale=key_norm_scale, key_positions=key_positions, pages=paged, block_k=block_k,
                        splits=splits, heads_per_block=heads_per_block, prefetch=prefetch, interpret=interpret)
