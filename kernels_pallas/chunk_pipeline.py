"""The chunk pipeline of the linear-attention kernels (kda, lightning): the kernels both families share.

- `state_pass`: sequential over chunks only. Holds one fp32 [K, BV] state per program (V split in blocks, so there
  are more programs than (batch, head) pairs), two matmuls per chunk (kda: three, the delta rule's W S), and writes
  the state entering every chunk in the inputs' dtype (bf16 in bf16 runs: it is consumed only as a matmul operand,
  which is cast to bf16 for the tensor cores / MXU anyway, and half the bytes of fp32).
- `output`: parallel over (batch, head, chunk, V block): o = qg S + A v_new.
- `reverse_pass`: the backward's sequential pass, chunks in reverse with the state's gradient as carry; writes the
  gradient of the state leaving every chunk and the values' gradient dv_new = A^T do + kg dS'.

The algebra (qg, kg, d, A, v_new) is in `chunked`'s docstring; how a kernel is launched over the chunks (a grid
axis, or a loop inside each program) in `chunk_call`'s.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from kernels_pallas.chunk_call import Operand, chunk_call, operand
from kernels_pallas.chunked import Plan, dot, head_gates, head_gates_row, iota, last_row, masked, masks

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Family:
    """What differs between kda and lightning in the shared kernels: kda's gates are per key channel (read from
    the chunk-local cumulative sums G), its values written are v_new = U - W S, and its intra-chunk scores A come
    from its own kernel; lightning's gate is one log decay per head and A = scale (q k^T) * decays."""
    delta_rule: bool

    @property
    def name(self) -> str:
        return "kda" if self.delta_rule else "lightning"


KDA = Family(delta_rule=True)
LIGHTNING = Family(delta_rule=False)


# ---- per-chunk quantities, from the chunk's tiles ----------------------------------------------------------

def gates(plan: Plan, family: Family, at: Any):
    """(G [C, Kg], Gamma [1, Kg]) of chunk at.n: kda reads its cumulative sums, lightning derives them."""
    if family.delta_rule:
        G = at.load("G")
        return G, last_row(G)
    return head_gates(plan, at.load("lam"), at.n)


def _doc(at: Any, plan: Plan):
    return masks(plan, at.n, at.load("doc"), at.load("prev")) if plan.has_segments else masks(plan, at.n)


def decayed(plan: Plan, family: Family, at: Any, dtype, *, want_q: bool, want_k: bool):
    """(qg, kg [C, K] in dtype, or None where not wanted; d [K or 1, 1] fp32) of chunk at.n."""
    m = _doc(at, plan)
    G, Gamma = gates(plan, family, at)
    qg = kg = None
    if want_q:
        qg = masked(m.carry_in, at.load("q").astype(F32) * (plan.scale * jnp.exp(G))).astype(dtype)
    if want_k:
        kg = masked(m.to_exit, at.load("k").astype(F32) * jnp.exp(Gamma - G)).astype(dtype)
    d = masked(m.through, jnp.exp(Gamma)).reshape(-1, 1)
    return qg, kg, d


def scores(plan: Plan, family: Family, at: Any, dtype):
    """A [C, C] in dtype: the chunk's decayed causal scores, read (kda) or built from q and k (lightning)."""
    if family.delta_rule:
        return at.load("A")
    C = plan.chunk
    m = _doc(at, plan)
    G, _ = head_gates(plan, at.load("lam"), at.n)
    pairs = iota((C, C), 0) >= iota((C, C), 1)
    if m.same is not None:
        pairs &= m.same
    decay = jnp.where(pairs, jnp.exp(jnp.where(pairs, G - head_gates_row(plan, at.load("lam"), at.n), 0.0)), 0.0)
    return (dot(at.load("q"), at.load("k"), contract=(1, 1)) * (plan.scale * decay)).astype(dtype)


# ---- the three shared kernels --------------------------------------------------------------------------------

def _common_inputs(plan: Plan, family: Family, *, gate, doc, prev):
    ops = [operand("G", "row", gate) if family.delta_rule else operand("lam", "head", gate)]
    if plan.has_segments:
        ops += [operand("doc", "doc", doc), operand("prev", "doc", prev)]
    return ops


def state_pass(plan: Plan, family: Family, *, k, U, W, gate, h0, doc, prev):
    """k [B,H,Tp,K]; U [B,H,Tp,V] (lightning: v); W [B,H,Tp,K] (kda) or None; gate: G [B,H,Tp,K] fp32 (kda) or
    the log decays [H,1,1] (lightning); h0 [B,H,K,V] fp32 -> (states entering each chunk [B,H,N,K,V] in U's dtype,
    v_new [B,H,Tp,V] in U's dtype (kda; None for lightning), final state [B,H,K,V] fp32)."""
    B, H, Tp, K = k.shape
    V = U.shape[-1]
    dtype = U.dtype
    inputs = [operand("k", "row", k), operand("U", "row_v", U), operand("h0", "state", h0)]
    inputs += [operand("W", "row", W)] if family.delta_rule else []
    inputs += _common_inputs(plan, family, gate=gate, doc=doc, prev=prev)
    outputs = [Operand("states", "states", (B, H, plan.num_chunks, K, V), dtype),
               Operand("final", "state", (B, H, K, V), F32)]
    outputs += [Operand("v_new", "row_v", U.shape, dtype)] if family.delta_rule else []

    def step(at, S):
        at.store("states", S)
        _, kg, d = decayed(plan, family, at, dtype, want_q=False, want_k=True)
        v_new = at.load("U")
        if family.delta_rule:
            v_new = (v_new.astype(F32) - dot(at.load("W"), S.astype(dtype))).astype(dtype)
            at.store("v_new", v_new)
        return d * S + dot(kg, v_new, contract=(0, 0))

    out = chunk_call(plan, step, inputs=inputs, outputs=outputs, name=f"{family.name}_state_pass",
                     batch_heads=(B, H), V=V, split_v=True, carry=("h0", "final"), K=K)
    return out[0], (out[2] if family.delta_rule else None), out[1]


def reverse_pass(plan: Plan, family: Family, *, q, k, W, A, gate, do, dfinal, doc, prev):
    """The backward's pass over the chunks in reverse. do [B,H,Tp,V]; A [B,H,Tp,C] (kda) or None; dfinal
    [B,H,K,V] fp32 -> (gradient of the state leaving each chunk [B,H,N,K,V] in do's dtype, dv_new [B,H,Tp,V] in
    do's dtype, gradient of the initial state [B,H,K,V] fp32)."""
    B, H, Tp, K = q.shape
    V = do.shape[-1]
    dtype = do.dtype
    inputs = [operand("q", "row", q), operand("k", "row", k), operand("do", "row_v", do),
              operand("dfinal", "state", dfinal)]
    if family.delta_rule:
        inputs += [operand("W", "row", W), operand("A", "row", A)]
    inputs += _common_inputs(plan, family, gate=gate, doc=doc, prev=prev)
    outputs = [Operand("dstates", "states", (B, H, plan.num_chunks, K, V), dtype),
               Operand("dh0", "state", (B, H, K, V), F32), Operand("dv", "row_v", do.shape, dtype)]

    def step(at, dS):
        at.store("dstates", dS)
        qg, kg, d = decayed(plan, family, at, dtype, want_q=True, want_k=True)
        do_c = at.load("do")
        dv = (dot(scores(plan, family, at, dtype), do_c, contract=(0, 0)) + dot(kg, dS.astype(dtype))).astype(dtype)
        at.store("dv", dv)
        dS_in = d * dS + dot(qg, do_c, contract=(0, 0))
        if family.delta_rule:
            dS_in = dS_in - dot(at.load("W"), dv, contract=(0, 0))
        return dS_in

    dstates, dh0, dv = chunk_call(plan, step, inputs=inputs, outputs=outputs, name=f"{family.name}_reverse_pass",
                                  batch_heads=(B, H), V=V, split_v=True, carry=("dfinal", "dh0"), K=K, reverse=True)
    return dstates, dv, dh0


def output(plan: Plan, family: Family, *, q, k, v_new, states, A, gate, doc, prev):
    """o [B,H,Tp,V] in v_new's dtype = qg S + A v_new, one program per (batch, head, chunk, V block)."""
    B, H, Tp, K = q.shape
    V = v_new.shape[-1]
    dtype = v_new.dtype
    inputs = [operand("q", "row", q), operand("k", "row", k), operand("v_new", "row_v", v_new),
              operand("states", "states", states)]
    inputs += [operand("A", "row", A)] if family.delta_rule else []
    inputs += _common_inputs(plan, family, gate=gate, doc=doc, prev=prev)

    def body(at):
        qg, _, _ = decayed(plan, family, at, dtype, want_q=True, want_k=False)
        at.store("o", dot(qg, at.load("states")) + dot(scores(plan, family, at, dtype), at.load("v_new")))

    [o] = chunk_call(plan, body, inputs=inputs, outputs=[Operand("o", "row_v", v_new.shape, dtype)],
                     name=f"{family.name}_output", batch_heads=(B, H), V=V, split_v=True)
    return o
