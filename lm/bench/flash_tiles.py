"""What `attnlab kernels tune` measures of a flash tile candidate (`kernels_pallas.flash.gpu_tiles`): the
forward and backward time on this machine's GPU, and the register spills of its three kernels for sm_90a (the
triton wheel's ptxas, through the structure report `lm.bench.kernels`). At bf16, one sequence, GQA 16/4, causal.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.flash.attention import flash_attention
from kernels_pallas.flash.gpu_tiles import Tiles
from lm.bench import kernels
from lm.bench.ops import median_time


def grads(tiles: Tiles):
    """The gradients of sum(o) through the flash kernels with these tiles (forward, dq and dk/dv run)."""
    def loss(q, k, v):
        o = flash_attention(q, k, v, block_q=tiles.block_q, block_k=tiles.block_k, launch=tiles.launch)
        return jnp.sum(o.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def shapes(head_dim: int, T: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    return tuple(jax.ShapeDtypeStruct((1, T, h, head_dim), jnp.bfloat16) for h in (16, 4, 4))


def spills(tiles: Tiles, head_dim: int, T: int = 8192) -> dict[str, int]:
    """Spill-store bytes of the forward, dq and dk/dv kernels with these tiles, compiled for sm_90a."""
    return {name: kernels.ptxas_usage(ir, warps, stages)["spill_store_bytes"]
            for name, ir, warps, stages in kernels.triton_modules(grads(tiles), *shapes(head_dim, T))}


def measure_on_device(T: int = 8192, reps: int = 5, *, skip_spills: bool = True):
    """measure(tiles, head_dim) for `gpu_tiles.tune`: the median seconds of the forward and backward on this
    machine's GPU, None for tiles whose kernels spill (when ptxas is installed) or fail to compile or run."""
    check = skip_spills and kernels.ptxas_available()

    def measure(tiles: Tiles, head_dim: int) -> float | None:
        if check and any(spills(tiles, head_dim, T).values()):
            return None
        args = [jax.random.normal(jax.random.key(i), s.shape, s.dtype) for i, s in enumerate(shapes(head_dim, T))]
        try:
            return median_time(jax.jit(grads(tiles)), args, reps)
        except Exception:  # noqa: BLE001  (a candidate that does not compile or run is not a choice)
            return None

    return measure
