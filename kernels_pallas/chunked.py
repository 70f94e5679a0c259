"""What the chunked linear-attention kernels (lightning, kda) share: the static plan of a call, the fp32 dot,
and the wrapper's layout work (heads before time, T zero-padded to whole chunks, the initial state, the document
columns the kernels read).

Both kernels run grid (batch, head) with a loop over chunks and the fp32 state as the loop's carry; a padded token
is all zeros, which both kernels treat as writing nothing (and, for kda, keeping the state), so the final state is
exact.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from kernels_pallas import platform


@dataclasses.dataclass(frozen=True)
class Plan:
    t: int              # tokens before padding
    t_pad: int          # padded to whole chunks
    chunk: int
    scale: float
    has_segments: bool
    interpret: bool
    num_warps: int

    @property
    def num_chunks(self) -> int:
        return self.t_pad // self.chunk


def dot(a, b, *, contract=(1, 0)):
    """fp32-accumulating a @ b over a's axis contract[0] and b's axis contract[1]; fp32 operands get
    full-precision products."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           preferred_element_type=jnp.float32, precision=precision)


def make_plan(q, *, chunks, min_chunk, chunk=None, scale=None, has_segments=False, interpret=None) -> Plan:
    """The plan of a call on q [B,T,H,K]: the target's (chunk, num_warps) from `chunks`, shrunk for short inputs
    to the next power of two >= T (not below `min_chunk`), unless `chunk` is given."""
    tgt = platform.target()
    pref, warps = chunks[tgt]
    T, K = q.shape[1], q.shape[3]
    C = chunk or min(pref, max(min_chunk[tgt], 1 << max(0, (T - 1).bit_length())))
    return Plan(t=T, t_pad=-(-T // C) * C, chunk=C, scale=float(K) ** -0.5 if scale is None else float(scale),
                has_segments=has_segments, interpret=platform.resolve_interpret(interpret), num_warps=warps)


def heads_first(plan: Plan, x):
    """[B,T,H,X] -> [B,H,T_pad,X], zero-padded."""
    return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, plan.t_pad - plan.t), (0, 0)))


def initial_state(state, B: int, H: int, K: int, V: int):
    return jnp.zeros((B, H, K, V), jnp.float32) if state is None else state.astype(jnp.float32)


def document_columns(plan: Plan, doc_ids):
    """(doc, prev) [B,T_pad,1] int32: each token's document index and that of the token before it (0 before
    token 0, the initial state's document); edge-padded. (None, None) without documents."""
    if doc_ids is None:
        return None, None
    ids = jnp.pad(doc_ids.astype(jnp.int32), ((0, 0), (0, plan.t_pad - plan.t)), mode="edge")
    return ids[:, :, None], jnp.pad(ids[:, :-1], ((0, 0), (1, 0)))[:, :, None]
