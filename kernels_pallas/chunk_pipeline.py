"""The chunk pipeline of the linear-attention kernels (kda, lightning): the kernels both families share.

- `state_pass`: sequential over chunks only. Holds one fp32 [K, BV] state per program (V split in blocks, so there
  are more programs than (batch, head) pairs), two matmuls per chunk (kda: three, the delta rule's W S), and writes
  the state entering every chunk in the inputs' dtype (bf16 in bf16 runs: it is consumed only as a matmul operand,
  which is cast to bf16 for the tensor cores / MXU anyway, and half the bytes of fp32).
- `output`: parallel over (batch, head, chunk, V block): o = qg S + A v_new.
- `reverse_pass`: the backward's sequential pass, chunks in reverse with the state's gradient as carry; writes the
  gradient of the state leaving every chunk and the values' gradient dv_new = A^T do + kg dS'.

The algebra (qg, kg, d, A, v_new) is in `chunked`'s docstring. A sequential pass has two drivers of one step
function: on TPU the chunks are the innermost grid axis ("arbitrary") and the state lives in VMEM scratch, so the
VMEM of a grid step is one chunk's tiles whatever T is; on Triton (whose grid steps are independent and have no
scratch) and interpreted on the CPU, a loop over the chunks runs inside each program with the state as its carry.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.chunked import Plan, compiler_params, dot, head_gates, head_gates_row, iota, last_row, masked, masks

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


# ---- operands and the two drivers --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Operand:
    """An array a pass reads or writes, by how it is laid out: "row" [B,H,Tp,X] (a chunk's rows, all X), "row_v"
    [B,H,Tp,V] (a chunk's rows, one V block), "head" [H,1,1], "state" [B,H,K,V] (one V block, the same for every
    chunk), "states" [B,H,N,K,V] (chunk n's, one V block), "doc" [B,Tp,1]."""
    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: Any


def _in(name: str, kind: str, x) -> tuple[Operand, Any]:
    return Operand(name, kind, x.shape, x.dtype), x


def _block(plan: Plan, op: Operand, driver: str):
    C, N, BV = plan.chunk, plan.num_chunks, plan.block_v
    whole = driver == "loop"
    if op.kind in ("row", "row_v"):
        width = op.shape[-1] if op.kind == "row" else BV
        return (None, None, plan.t_pad if whole else C, width)
    if op.kind == "head":
        return (None, 1, 1)
    if op.kind == "state":
        return (None, None, op.shape[2], BV)
    if op.kind == "states":
        return (None, None, N if whole else None, op.shape[3], BV)
    if op.kind == "doc":
        return (None, plan.t_pad if whole else C, 1)
    raise ValueError(op.kind)


def _index_map(plan: Plan, op: Operand, driver: str, reverse: bool):
    N = plan.num_chunks
    chunk = (lambda n: N - 1 - n) if reverse else (lambda n: n)
    if driver == "loop":
        c_of = lambda *_: 0  # noqa: E731  (whole rows)
    else:
        c_of = lambda *ids: chunk(ids[3])  # noqa: E731
    maps = {
        "row": lambda *ids: (ids[0], ids[1], c_of(*ids), 0),
        "row_v": lambda *ids: (ids[0], ids[1], c_of(*ids), ids[2]),
        "head": lambda *ids: (ids[1], 0, 0),
        "state": lambda *ids: (ids[0], ids[1], 0, ids[2]),
        "states": lambda *ids: (ids[0], ids[1], c_of(*ids), 0, ids[2]),
        "doc": lambda *ids: (ids[0], c_of(*ids), 0),
    }
    return maps[op.kind]


class _At:
    """Chunk c of a pass's refs: whole blocks under the grid driver, slices of whole rows under the loop."""

    def __init__(self, refs: dict[str, Any], kinds: dict[str, str], plan: Plan, c, driver: str):
        self.refs, self.kinds, self.plan, self.c, self.driver = refs, kinds, plan, c, driver

    def _index(self, name):
        if self.driver == "grid" or self.kinds[name] in ("head", "state"):
            return ...
        if self.kinds[name] == "states":
            return self.c
        return (pl.ds(pl.multiple_of(self.c * self.plan.chunk, self.plan.chunk), self.plan.chunk), slice(None))

    def has(self, name) -> bool:
        return name in self.refs

    def load(self, name):
        return self.refs[name][self._index(name)]

    def store(self, name, value):
        ref = self.refs[name]
        ref[self._index(name)] = value.astype(ref.dtype)


def sequential(plan: Plan, step: Callable, *, inputs: list[tuple[Operand, Any]], outputs: list[Operand],
               init: str, final: str, reverse: bool, name: str, batch_heads: tuple[int, int], K: int,
               V: int):
    """Run `step(at, S) -> S'` over the chunks (in reverse if `reverse`) with an fp32 [K, BV] carry per
    (batch, head, V block): starting from input `init` ("state" kind), ending in output `final` ("state" kind)."""
    B, H = batch_heads
    N, NV = plan.num_chunks, V // plan.block_v
    driver = plan.sequential
    in_ops = [op for op, _ in inputs]
    kinds = {op.name: op.kind for op in in_ops + outputs}
    specs = lambda ops: [pl.BlockSpec(_block(plan, op, driver), _index_map(plan, op, driver, reverse))  # noqa
                         for op in ops]
    names_in = [op.name for op in in_ops]
    names_out = [op.name for op in outputs]

    def kernel(*refs):
        named = dict(zip(names_in + names_out, refs))
        if driver == "grid":
            scratch = refs[-1]
            n = pl.program_id(3)
            c = N - 1 - n if reverse else n

            @pl.when(n == 0)
            def _():
                scratch[...] = named[init][...].astype(F32)

            S = step(_At(named, kinds, plan, c, driver), scratch[...])
            scratch[...] = S

            @pl.when(n == N - 1)
            def _():
                named[final][...] = S
        else:
            def body(i, S):
                c = N - 1 - i if reverse else i
                return step(_At(named, kinds, plan, c, driver), S)

            named[final][...] = lax.fori_loop(0, N, body, named[init][...].astype(F32))

    grid = (B, H, NV, N) if driver == "grid" else (B, H, NV)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=specs(in_ops), out_specs=tuple(specs(outputs)),
        out_shape=tuple(jax.ShapeDtypeStruct(op.shape, op.dtype) for op in outputs),
        scratch_shapes=[pltpu.VMEM((K, plan.block_v), F32)] if driver == "grid" else [],
        interpret=plan.interpret, name=name,
        compiler_params=compiler_params(plan, len(grid), sequential_last=driver == "grid"),
    )(*[x for _, x in inputs])


# ---- per-chunk quantities, from the chunk's tiles ----------------------------------------------------------

def gates(plan: Plan, family: Family, at: Any):
    """(G [C, Kg], Gamma [1, Kg]) of chunk at.c: kda reads its cumulative sums, lightning derives them."""
    if family.delta_rule:
        G = at.load("G")
        return G, last_row(G)
    return head_gates(plan, at.load("lam"), at.c)


def _doc(at: Any, plan: Plan):
    return masks(plan, at.c, at.load("doc"), at.load("prev")) if plan.has_segments else masks(plan, at.c)


def decayed(plan: Plan, family: Family, at: Any, dtype, *, want_q: bool, want_k: bool):
    """(qg, kg [C, K] in dtype, or None where not wanted; d [K or 1, 1] fp32) of chunk at.c."""
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
    G, _ = head_gates(plan, at.load("lam"), at.c)
    pairs = iota((C, C), 0) >= iota((C, C), 1)
    if m.same is not None:
        pairs &= m.same
    decay = jnp.where(pairs, jnp.exp(jnp.where(pairs, G - head_gates_row(plan, at.load("lam"), at.c), 0.0)), 0.0)
    return (dot(at.load("q"), at.load("k"), contract=(1, 1)) * (plan.scale * decay)).astype(dtype)


# ---- the three shared kernels --------------------------------------------------------------------------------

def _common_inputs(plan: Plan, family: Family, *, gate, doc, prev):
    ops = [_in("G", "row", gate) if family.delta_rule else _in("lam", "head", gate)]
    if plan.has_segments:
        ops += [_in("doc", "doc", doc), _in("prev", "doc", prev)]
    return ops


def state_pass(plan: Plan, family: Family, *, k, U, W, gate, h0, doc, prev):
    """k [B,H,Tp,K]; U [B,H,Tp,V] (lightning: v); W [B,H,Tp,K] (kda) or None; gate: G [B,H,Tp,K] fp32 (kda) or
    the log decays [H,1,1] (lightning); h0 [B,H,K,V] fp32 -> (states entering each chunk [B,H,N,K,V] in U's dtype,
    v_new [B,H,Tp,V] in U's dtype (kda; None for lightning), final state [B,H,K,V] fp32)."""
    B, H, Tp, K = k.shape
    V = U.shape[-1]
    dtype = U.dtype
    inputs = [_in("k", "row", k), _in("U", "row_v", U),
              _in("h0", "state", h0)]
    inputs += [_in("W", "row", W)] if family.delta_rule else []
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

    out = sequential(plan, step, inputs=inputs, outputs=outputs, init="h0", final="final", reverse=False,
                     name=f"{family.name}_state_pass", batch_heads=(B, H), K=K, V=V)
    states, final = out[0], out[1]
    return states, (out[2] if family.delta_rule else None), final


def reverse_pass(plan: Plan, family: Family, *, q, k, W, A, gate, do, dfinal, doc, prev):
    """The backward's pass over the chunks in reverse. do [B,H,Tp,V]; A [B,H,Tp,C] (kda) or None; dfinal
    [B,H,K,V] fp32 -> (gradient of the state leaving each chunk [B,H,N,K,V] in do's dtype, dv_new [B,H,Tp,V] in
    do's dtype, gradient of the initial state [B,H,K,V] fp32)."""
    B, H, Tp, K = q.shape
    V = do.shape[-1]
    dtype = do.dtype
    inputs = [_in("q", "row", q), _in("k", "row", k),
              _in("do", "row_v", do), _in("dfinal", "state", dfinal)]
    if family.delta_rule:
        inputs += [_in("W", "row", W), _in("A", "row", A)]
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

    dstates, dh0, dv = sequential(plan, step, inputs=inputs, outputs=outputs, init="dfinal", final="dh0",
                                  reverse=True, name=f"{family.name}_reverse_pass", batch_heads=(B, H), K=K, V=V)
    return dstates, dv, dh0


def output(plan: Plan, family: Family, *, q, k, v_new, states, A, gate, doc, prev):
    """o [B,H,Tp,V] in v_new's dtype = qg S + A v_new, one program per (batch, head, chunk, V block)."""
    B, H, Tp, K = q.shape
    V = v_new.shape[-1]
    C, BV, N = plan.chunk, plan.block_v, plan.num_chunks
    dtype = v_new.dtype
    row = lambda width: pl.BlockSpec((None, None, C, width), lambda b, h, n, j: (b, h, n, 0))  # noqa: E731
    row_v = pl.BlockSpec((None, None, C, BV), lambda b, h, n, j: (b, h, n, j))
    names = ["q", "k", "v_new", "states"]
    specs = [row(K), row(K), row_v, pl.BlockSpec((None, None, None, K, BV), lambda b, h, n, j: (b, h, n, 0, j))]
    args = [q, k, v_new, states]
    if family.delta_rule:
        names += ["A", "G"]
        specs += [row(C), row(K)]
        args += [A, gate]
    else:
        names.append("lam")
        specs.append(pl.BlockSpec((None, 1, 1), lambda b, h, n, j: (h, 0, 0)))
        args.append(gate)
    if plan.has_segments:
        names += ["doc", "prev"]
        specs += [pl.BlockSpec((None, C, 1), lambda b, h, n, j: (b, n, 0))] * 2
        args += [doc, prev]
    kinds = {nm: "row" for nm in names}

    def kernel(*refs):
        named = dict(zip(names, refs))
        at = _At(named, kinds, plan, pl.program_id(2), "grid")
        qg, _, _ = decayed(plan, family, at, dtype, want_q=True, want_k=False)
        o = dot(qg, at.load("states")) + dot(scores(plan, family, at, dtype), at.load("v_new"))
        refs[-1][...] = o.astype(refs[-1].dtype)

    return pl.pallas_call(
        kernel, grid=(B, H, N, V // BV), in_specs=specs, out_specs=row_v,
        out_shape=jax.ShapeDtypeStruct((B, H, Tp, V), dtype), interpret=plan.interpret,
        name=f"{family.name}_output", compiler_params=compiler_params(plan, 4),
    )(*args)
