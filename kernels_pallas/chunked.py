"""What the chunked linear-attention kernels (lightning, kda) share: the static plan of a call, the dot, the wrapper's
layout work, and the per-chunk quantities every kernel of the pipeline derives the same way (document masks and the
gates' cumulative log decays).

Both families are gated linear attention over chunks of C tokens. With S the [K, V] state entering a chunk, G_i the
cumulative log decay from the chunk's start through token i (per key channel for kda, per head for lightning) and
Gamma the chunk's total:

    qg_i = scale q_i exp(G_i)            the queries' view of the incoming state
    kg_j = k_j exp(Gamma - G_j)          each key's write, decayed to the chunk's end
    d    = exp(Gamma)                    the incoming state's decay through the chunk
    o    = qg S + A v_new                A: the decayed causal intra-chunk scores, v_new the values written
    S'   = d S + kg^T v_new

For lightning v_new = v; for kda v_new = U - W S (the delta rule's WY form, see kda/intra.py). Every exponent is a
gate sum over a causal range, so it is <= 0: large decays underflow to zero and never overflow.

Documents (`doc`, `prev`: each token's document index and that of the token before it) enter only through masks:
the incoming state reaches the tokens of the chunk's first document if that is the document before the chunk,
a key's write reaches the outgoing state if it is in the chunk's last document, and the incoming state passes
through if the chunk holds one document that continues the previous one.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from kernels_pallas import platform

SUB = 16          # rows of the sub-blocks the intra-chunk kernels work in (Triton's smallest dot)
# Scoped VMEM each kernel may use on TPU: the project's bound (`lm.bench.kernels.VMEM_BOUND_BYTES`), within every chip's
# capacity; the pipeline's kernels need at most ~1 MiB a grid step at K = V = 128 (`kernels lower --report`).
VMEM_LIMIT_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True)
class Plan:
    t: int              # tokens before padding
    t_pad: int          # padded to whole chunks
    chunk: int
    scale: float
    has_segments: bool
    interpret: bool
    num_warps: int
    block_v: int        # V columns per program of the sequential passes (more programs than (batch, head))
    parallel: str       # the drivers (chunk_call.py) of the parallel kernels and of the passes over chunks:
    sequential: str     # "grid" (chunks as grid axes) or "loop" (a loop over chunks inside each program)

    @property
    def num_chunks(self) -> int:
        return self.t_pad // self.chunk

    @property
    def sub(self) -> int:
        return min(SUB, self.chunk)

    @property
    def subs(self) -> int:
        return self.chunk // self.sub


def dot(a, b, *, contract=(1, 0)):
    """fp32-accumulating a @ b over a's axis contract[0] and b's axis contract[1]; fp32 operands get
    full-precision products (bf16 operands run at the tensor cores' / MXU's full rate)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           preferred_element_type=jnp.float32, precision=precision)


def compiler_params(plan: Plan, axes: int, *, warps: int | None = None, sequential_last: bool = False):
    """The target's compiler parameters for a kernel of the pipeline with `axes` grid axes, all parallel but the
    last when `sequential_last` (TPU); `warps` overrides the plan's Triton warps for kernels with larger tiles."""
    semantics = ("parallel",) * (axes - 1) + ("arbitrary" if sequential_last else "parallel",)
    return platform.compiler_params(gpu=dict(num_warps=warps or plan.num_warps, num_stages=2),
                                    tpu=dict(dimension_semantics=semantics, vmem_limit_bytes=VMEM_LIMIT_BYTES))


def iota(shape, axis):
    return lax.broadcasted_iota(jnp.int32, shape, axis)


# (parallel, sequential) drivers per target: the accelerators run a program per chunk; TPU carries a pass's state
# through its sequential grid axis, Triton through a loop; the CPU interpreter loops (see chunk_call.py).
DRIVERS = {"cpu": ("loop", "loop"), "gpu": ("grid", "loop"), "tpu": ("grid", "grid")}


def make_plan(q, v, *, chunks, min_chunk, block_v, chunk=None, scale=None, has_segments=False,
              interpret=None, drivers=None) -> Plan:
    """The plan of a call on q [B,T,H,K], v [B,T,H,V]: the target's (chunk, num_warps) from `chunks`, shrunk for
    short inputs to the next power of two >= T (not below `min_chunk`), unless `chunk` is given; V split in
    blocks of `block_v[target]` (or all of V); the target's (parallel, sequential) drivers unless `drivers`."""
    tgt = platform.target()
    pref, warps = chunks[tgt]
    T, K = q.shape[1], q.shape[3]
    V = v.shape[3]
    C = chunk or min(pref, max(min_chunk[tgt], 1 << max(0, (T - 1).bit_length())))
    bv = block_v[tgt]
    return Plan(t=T, t_pad=-(-T // C) * C, chunk=C, scale=float(K) ** -0.5 if scale is None else float(scale),
                has_segments=has_segments, interpret=platform.resolve_interpret(interpret), num_warps=warps,
                block_v=bv if V % bv == 0 else V, parallel=(drivers or DRIVERS[tgt])[0],
                sequential=(drivers or DRIVERS[tgt])[1])


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


def chunk_sums(plan: Plan, g):
    """g [B,H,T_pad,K] -> the inclusive cumulative sums within each chunk, fp32 (padded gates are 0, so the
    padded tail of the last chunk holds its total)."""
    B, H, Tp, K = g.shape
    G = jnp.cumsum(g.astype(jnp.float32).reshape(B, H, Tp // plan.chunk, plan.chunk, K), axis=3)
    return G.reshape(B, H, Tp, K)


def chunk_suffix_sums(plan: Plan, x):
    """x [B,H,T_pad,K] fp32 -> for each token the sum of x over it and the chunk's later tokens (the transpose of
    `chunk_sums`, for gradients)."""
    B, H, Tp, K = x.shape
    y = x.reshape(B, H, Tp // plan.chunk, plan.chunk, K)
    return jnp.flip(jnp.cumsum(jnp.flip(y, 3), axis=3), 3).reshape(B, H, Tp, K)


def chunk_prefix_sums(plan: Plan, x):
    """x [B,H,T_pad,K] fp32 -> for each token the sum of x over the chunk's earlier tokens (exclusive)."""
    B, H, Tp, K = x.shape
    y = x.reshape(B, H, Tp // plan.chunk, plan.chunk, K)
    # Shifted, not an inclusive sum minus x: a large later term must not cancel away the small earlier ones.
    y = jnp.pad(y[:, :, :, :-1], ((0, 0), (0, 0), (0, 0), (1, 0), (0, 0)))
    return jnp.cumsum(y, axis=3).reshape(B, H, Tp, K)


@dataclasses.dataclass
class Masks:
    """Chunk n's document masks (None: the mask is all true)."""
    same: jnp.ndarray | None        # [R, C] token pairs in one document (R rows of the chunk against all C)
    carry_in: jnp.ndarray | None    # [R, 1] tokens the incoming state reaches
    to_exit: jnp.ndarray | None     # [R, 1] tokens whose writes reach the outgoing state
    through: jnp.ndarray | None     # [1, 1] the incoming state reaches the chunk's end


def masks(plan: Plan, n, doc=None, prev=None, rows=None) -> Masks:
    """doc, prev [C, 1] int32 for chunk n (None without documents); rows [R, 1] int32: the doc column of the
    R rows these masks are for (default: the whole chunk)."""
    if doc is None:
        return Masks(None, None, None, None)
    C = plan.chunk
    i = iota((C, 1), 0)
    rows = doc if rows is None else rows
    real = i < jnp.minimum(C, plan.t - n * C)
    before = jnp.max(jnp.where(i == 0, prev, -1), axis=0, keepdims=True)     # the document before the chunk
    last = jnp.max(jnp.where(real, doc, -1), axis=0, keepdims=True)          # the document of its last token
    return Masks(same=rows == doc.reshape(1, C), carry_in=rows == before, to_exit=rows == last,
                 through=last == before)


def masked(mask, x):
    return x if mask is None else jnp.where(mask, x, 0.0)


def head_gates(plan: Plan, lam, n):
    """Lightning's cumulative log decays in chunk n for a per-head log decay lam [1, 1] (<= 0): G [C, 1], token i's
    lam (i + 1) counted from the chunk's start (constant past the last real token), and Gamma [1, 1] = lam times
    the chunk's real tokens."""
    C = plan.chunk
    length = jnp.minimum(C, plan.t - n * C)
    G = lam * jnp.minimum(iota((C, 1), 0) + 1, length).astype(jnp.float32)
    return G, lam * length.astype(jnp.float32)


def head_gates_row(plan: Plan, lam, n):
    """head_gates' G laid out along a row: [1, C]."""
    C = plan.chunk
    length = jnp.minimum(C, plan.t - n * C)
    return lam * jnp.minimum(iota((1, C), 1) + 1, length).astype(jnp.float32)


def last_row(x):
    """The last row of x [R, X] as [1, X] (a masked reduction: no value slicing)."""
    return jnp.sum(jnp.where(iota(x.shape, 0) == x.shape[0] - 1, x, 0.0), axis=0, keepdims=True)


def first_row(x):
    return jnp.sum(jnp.where(iota(x.shape, 0) == 0, x, 0.0), axis=0, keepdims=True)
