"""Layout copies around the flash kernels: the transposes, pads and slices of q/k/v/o-sized tensors in the lowered
program of one forward + backward (the gradient of sum(o) with respect to q, k, v and the gate).

Each such op is a copy through HBM once compiled (XLA fuses a transpose with its pad into one copy, so the ops
over-count copies by that much). Counted in the StableHLO of a lowering for cuda (H200) and tpu (v5p) on any
machine; bf16, B=1, 16 query heads, 4 KV heads, causal.

    python -m experiments.bench.flash_layout_copies [--T 8192 8100] [--D 128 80]
"""
from __future__ import annotations

import argparse
import re
from collections import Counter

import jax
import jax.numpy as jnp

from kernels_pallas import platform
from kernels_pallas.flash import flash_attention

LAYOUT_OPS = ("transpose", "pad", "slice")
_OP = re.compile(r"stablehlo\.(\w+)\b")
_RESULT = re.compile(r"tensor<([0-9x]+)x(?:bf16|f16|f32|i32|i1)>")


def layout_copies(lowered_text: str, min_elements: int) -> Counter:
    """{(op, result shape): count} of the transposes, pads and slices whose result has at least min_elements."""
    found: Counter = Counter()
    for line in lowered_text.splitlines():
        op = _OP.search(line)
        shapes = _RESULT.findall(line)
        if not op or op.group(1) not in LAYOUT_OPS or not shapes:
            continue
        dims = [int(d) for d in shapes[-1].split("x")]
        size = 1
        for d in dims:
            size *= d
        if size >= min_elements:
            found[(op.group(1), shapes[-1])] += 1
    return found


def lowered_step(T: int, D: int, *, gate: bool, platform_name: str, Hq: int = 16, Hkv: int = 4) -> str:
    """The lowered text of flash's forward + backward at bf16 (with the SP-KV gate and a 64-key local window when
    gate, which on GPU splits the keys into the window's band and compact blocks)."""
    spec = jax.ShapeDtypeStruct
    args = [spec((1, T, Hq, D), jnp.bfloat16), spec((1, T, Hkv, D), jnp.bfloat16),
            spec((1, T, Hkv, D), jnp.bfloat16)] + ([spec((1, T, Hkv), jnp.float32)] if gate else [])

    def step(q, k, v, *g):
        def loss(q, k, v, *g):
            o = flash_attention(q, k, v, key_log_gate=g[0] if g else None, local_window=64 if g else None)
            return jnp.sum(o.astype(jnp.float32))

        return jax.grad(loss, argnums=tuple(range(len(args))))(q, k, v, *g)

    return platform.lower(step, *args, platform=platform_name).as_text()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[8192, 8100])
    parser.add_argument("--D", type=int, nargs="+", default=[128, 80])
    args = parser.parse_args(argv)
    print("platform  T      D    gate  layout ops on >= T*D elements")
    for T in args.T:
        for D in args.D:
            for gate in (False, True):
                for name in ("cuda", "tpu"):
                    found = layout_copies(lowered_step(T, D, gate=gate, platform_name=name), T * D)
                    detail = ", ".join(f"{op} {shape} x{n}" for (op, shape), n in sorted(found.items()))
                    print(f"{name:8}  {T:<6} {D:<4} {'yes' if gate else 'no':4}  {sum(found.values()):2}  {detail}")


if __name__ == "__main__":
    main()
