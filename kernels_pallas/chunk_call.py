"""One `pallas_call` over the chunks of a row, with either driver: how every kernel of the chunk pipeline is launched.

A kernel's body sees one chunk (or one 16-row sub-block of it) through an accessor `at`: `at.n` and `at.i` are the
chunk and sub-block, `at.load(name)` / `at.store(name, value)` read and write that chunk's tile of an operand. The
body is the same under both drivers; the driver decides where the chunks come from:

- "grid": the chunks (and sub-blocks, and V blocks) are grid axes and every operand's block is one chunk's tile.
  This is the accelerators' layout: a program per (head, chunk) for the parallel kernels; for a sequential pass
  (a carry from chunk to chunk) the chunks are the innermost, sequential grid axis and the carry lives in VMEM
  scratch (TPU), so a grid step's VMEM is one chunk's tiles whatever T is.
- "loop": the grid covers (batch, head, V block); each program reads whole rows and loops over the chunks (and
  sub-blocks) inside. Triton runs the sequential passes this way (its grid steps are independent and it has no
  scratch), and the CPU interpreter runs every kernel this way: it copies every operand once per grid step, so a
  grid of (batch, head, chunk, sub-block) steps costs it far more than the same work in (batch, head) steps.

Operand kinds (arrays heads-first, T padded to whole chunks):
  row [B,H,Tp,X]: a chunk's rows, all X;      row_v [B,H,Tp,V]: a chunk's rows, one V block;
  sub [B,H,Tp,X]: a sub-block's rows;         head [H,1,1]: one value per head;
  state [B,H,K,V]: one V block, every chunk;  states [B,H,N,K,V]: chunk n's, one V block;
  doc [B,Tp,1]: a chunk's rows;               doc_sub [B,Tp,1]: a sub-block's rows.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.chunked import Plan, compiler_params

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Operand:
    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: Any


def operand(name: str, kind: str, x) -> tuple[Operand, Any]:
    """An input: its name and kind, and the array."""
    return Operand(name, kind, tuple(x.shape), x.dtype), x


class At:
    """Chunk n (sub-block i) of a call's refs."""

    def __init__(self, refs: dict[str, Any], kinds: dict[str, str], plan: Plan, n, i, whole_rows: bool):
        self.refs, self.kinds, self.plan, self.n, self.i, self.whole_rows = refs, kinds, plan, n, i, whole_rows

    def _index(self, name):
        kind = self.kinds[name]
        if not self.whole_rows or kind in ("head", "state"):
            return ...
        if kind == "states":
            return self.n
        C = self.plan.chunk
        if kind in ("sub", "doc_sub"):
            BC = self.plan.sub
            start = pl.multiple_of(self.n * C + self.i * BC, BC)
            return pl.ds(start, BC), slice(None)
        return pl.ds(pl.multiple_of(self.n * C, C), C), slice(None)

    def has(self, name) -> bool:
        return name in self.refs

    def load(self, name):
        return self.refs[name][self._index(name)]

    def store(self, name, value):
        ref = self.refs[name]
        ref[self._index(name)] = value.astype(ref.dtype)


def _spec(plan: Plan, op: Operand, *, whole_rows: bool, axes: dict[str, int], bv: int, reverse: bool):
    """The BlockSpec of an operand: a chunk's (sub-block's) tile under the grid driver, whole rows under the loop."""
    C, N, BC, S, Tp = plan.chunk, plan.num_chunks, plan.sub, plan.subs, plan.t_pad

    def ax(name):
        return (lambda ids: ids[axes[name]]) if name in axes else (lambda ids: 0)

    b, h, j, i = ax("b"), ax("h"), ax("j"), ax("i")
    n = ax("n")
    if reverse and "n" in axes:
        n = lambda ids: N - 1 - ids[axes["n"]]  # noqa: E731
    X = op.shape[-1]
    if op.kind == "head":
        return pl.BlockSpec((None, 1, 1), lambda *ids: (h(ids), 0, 0))
    if op.kind == "state":
        return pl.BlockSpec((None, None, op.shape[2], bv), lambda *ids: (b(ids), h(ids), 0, j(ids)))
    if whole_rows:
        if op.kind == "states":
            return pl.BlockSpec((None, None, N, op.shape[3], bv), lambda *ids: (b(ids), h(ids), 0, 0, j(ids)))
        if op.kind in ("doc", "doc_sub"):
            return pl.BlockSpec((None, Tp, 1), lambda *ids: (b(ids), 0, 0))
        width = bv if op.kind == "row_v" else X
        return pl.BlockSpec((None, None, Tp, width), lambda *ids: (b(ids), h(ids), 0, j(ids) if op.kind == "row_v" else 0))
    if op.kind == "states":
        return pl.BlockSpec((None, None, None, op.shape[3], bv), lambda *ids: (b(ids), h(ids), n(ids), 0, j(ids)))
    if op.kind == "doc":
        return pl.BlockSpec((None, C, 1), lambda *ids: (b(ids), n(ids), 0))
    if op.kind == "doc_sub":
        return pl.BlockSpec((None, BC, 1), lambda *ids: (b(ids), n(ids) * S + i(ids), 0))
    if op.kind == "sub":
        return pl.BlockSpec((None, None, BC, X), lambda *ids: (b(ids), h(ids), n(ids) * S + i(ids), 0))
    if op.kind == "row_v":
        return pl.BlockSpec((None, None, C, bv), lambda *ids: (b(ids), h(ids), n(ids), j(ids)))
    if op.kind == "row":
        return pl.BlockSpec((None, None, C, X), lambda *ids: (b(ids), h(ids), n(ids), 0))
    raise ValueError(f"unknown operand kind {op.kind!r}")


def chunk_call(plan: Plan, body: Callable, *, inputs: list[tuple[Operand, Any]], outputs: list[Operand], name: str,
               batch_heads: tuple[int, int], V: int = 1, split_v: bool = False, subs: bool = False,
               carry: tuple[str, str] | None = None, K: int = 1, reverse: bool = False, warps: int | None = None):
    """Run `body` on every chunk (and, with `subs`, every 16-row sub-block; with `split_v`, every V block of width
    plan.block_v). A sequential call has a `carry` = (input, output) of kind "state": body(at, S) -> S' runs over
    the chunks in order (reversed with `reverse`) from an fp32 [K, BV] start read from the input, and the last
    carry is written to the output. Returns the outputs, in order."""
    B, H = batch_heads
    N = plan.num_chunks
    bv = plan.block_v if split_v else V
    NV = V // bv if split_v else 1
    S = plan.subs if subs else 1
    sequential = carry is not None
    driver = plan.sequential if sequential else plan.parallel
    whole_rows = driver == "loop"
    # Grid axes, by name: batch, head, V block (when split), then chunk and sub-block under the grid driver. A
    # sequential call's chunks come last: the innermost axis, sequential on TPU.
    names = ["b", "h"] + (["j"] if split_v else []) + ([] if whole_rows else ["n"] + (["i"] if subs else []))
    sizes = {"b": B, "h": H, "j": NV, "n": N, "i": S}
    grid = tuple(sizes[a] for a in names)
    axes = {a: k for k, a in enumerate(names)}
    in_ops = [op for op, _ in inputs]
    kinds = {op.name: op.kind for op in in_ops + outputs}
    op_names = [op.name for op in in_ops + outputs]
    spec = lambda op: _spec(plan, op, whole_rows=whole_rows, axes=axes, bv=bv, reverse=reverse)  # noqa: E731

    def kernel(*refs):
        named = dict(zip(op_names, refs))

        def at(n, i=0):
            return At(named, kinds, plan, n, i, whole_rows)

        if not sequential:
            if not whole_rows:
                body(at(pl.program_id(axes["n"]), pl.program_id(axes["i"]) if subs else 0))
            elif subs:
                lax.fori_loop(0, N * S, lambda k, _: body(at(k // S, k % S)), None)
            else:
                lax.fori_loop(0, N, lambda n, _: body(at(n)), None)
            return
        start, end = carry
        if whole_rows:
            def step(k, S_):
                return body(at(N - 1 - k if reverse else k), S_)

            named[end][...] = lax.fori_loop(0, N, step, named[start][...].astype(F32))
            return
        scratch = refs[-1]
        k = pl.program_id(axes["n"])

        @pl.when(k == 0)
        def _():
            scratch[...] = named[start][...].astype(F32)

        S_ = body(at(N - 1 - k if reverse else k), scratch[...])
        scratch[...] = S_

        @pl.when(k == N - 1)
        def _():
            named[end][...] = S_

    scratch = [pltpu.VMEM((K, bv), F32)] if sequential and not whole_rows else []
    out = pl.pallas_call(
        kernel, grid=grid, in_specs=[spec(op) for op in in_ops], out_specs=tuple(spec(op) for op in outputs),
        out_shape=tuple(jax.ShapeDtypeStruct(op.shape, op.dtype) for op in outputs), scratch_shapes=scratch,
        interpret=plan.interpret, name=name,
        compiler_params=compiler_params(plan, len(grid), warps=warps, sequential_last=sequential and not whole_rows),
    )(*[x for _, x in inputs])
    return out
