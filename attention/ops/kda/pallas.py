"""The chunked Pallas KDA forward kernel (`kernels_pallas.kda`) as the `pallas` implementation of `kda`.

The forward is the kernel (interpreted on the CPU, Triton on GPU, Mosaic on TPU). There is no backward kernel
yet: the gradient recomputes the op through the `xla` form and differentiates that (a `custom_vjp`), so
gradients are exactly xla's. Training with it therefore costs a kernel forward plus xla's forward and backward,
which is why `auto` does not choose it; ask for impl="pallas" explicitly (inference and prefill gain, and the
parity tests run it).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attention.ops import dispatch
from attention.ops.kda.xla import kda_xla
from attention.ops.recurrent import doc_starts
from kernels_pallas.kda import kda_forward

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def supports(*, backend, dtype, **_):
    if jnp.dtype(dtype) not in {jnp.dtype(d) for d in DTYPES}:
        return f"the kda kernel takes float32, bfloat16 or float16 inputs, not {jnp.dtype(dtype).name}"
    return None


@dispatch.register("kda", "pallas", supports=supports,
                   not_for_auto="the kda kernel is forward only (its gradient recomputes through xla), so for "
                                "training xla alone is cheaper")
def kda_pallas(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
               chunk=None, interpret=None):
    """chunk overrides the kernel's chunk (tests); interpret=None interprets exactly on the CPU."""
    o, final = _kda((scale, chunk, interpret), q, k, v, g, beta, initial_state, segment_ids)
    return o, (final if output_final_state else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kda(static, q, k, v, g, beta, initial_state, segment_ids):
    scale, chunk, interpret = static
    B, T = q.shape[:2]
    doc = None if segment_ids is None else jnp.cumsum(doc_starts(segment_ids, B, T), axis=1, dtype=jnp.int32)
    return kda_forward(q, k, v, g, beta, scale=scale, initial_state=initial_state, doc_ids=doc, chunk=chunk,
                       interpret=interpret)


def _kda_fwd(static, q, k, v, g, beta, initial_state, segment_ids):
    return _kda(static, q, k, v, g, beta, initial_state, segment_ids), (q, k, v, g, beta, initial_state, segment_ids)


def _kda_bwd(static, res, cts):
    scale = static[0]
    q, k, v, g, beta, initial_state, segment_ids = res
    do, dfinal = cts

    def xla_form(q, k, v, g, beta, h0):
        return kda_xla(q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=True,
                       segment_ids=segment_ids)

    h0 = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32) \
        if initial_state is None else initial_state
    _, vjp = jax.vjp(xla_form, q, k, v, g, beta, h0)
    dq, dk, dv, dg, dbeta, dh0 = vjp((do, dfinal))
    return dq, dk, dv, dg, dbeta, None if initial_state is None else dh0, None


_kda.defvjp(_kda_fwd, _kda_bwd)
