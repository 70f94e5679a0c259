"""How each driver's kernels take their operands, and the wrapper-side changes that gives (`flash_attention`).

- `IN_PLACE` (the row driver: CPU interpret and Triton): the op's own layout, q [B,T,Hq,D], keys [B,S,Hkv,D],
  per-key rows (gate, compact positions and documents) [B,S,Hkv], documents [B,T]. Nothing is copied: the
  kernels' blocks index these arrays, and ragged T and S are masked inside the kernels.
- `HEADS_FIRST` (the TPU pipeline): heads before time, zero-padded to whole blocks, per-key rows lane-dense as
  [B,Hkv,1,Sp], documents [B,1,Tp] edge-padded. Mosaic's blocks need their last two dims whole or (8, 128)
  multiples, and it has no masked loads, so the pipeline reads whole blocks of padded copies.

Every method takes the call's plan; `lse_column` turns a driver's lse into a column that broadcasts against its
output (for merging the outputs of key sets, `attention._merge`).
"""
from __future__ import annotations

import jax.numpy as jnp

from kernels_pallas.flash.tiles import Plan

EDGE = "edge"


class InPlace:
    @staticmethod
    def queries(plan: Plan, x):
        return x

    @staticmethod
    def keys(plan: Plan, x):
        return x

    @staticmethod
    def key_rows(plan: Plan, x_BSH, fill):
        return x_BSH

    @staticmethod
    def documents(plan: Plan, ids_BT, *, keys: bool):
        return ids_BT

    @staticmethod
    def output(plan: Plan, o):
        return o

    @staticmethod
    def lse_column(lse):
        return lse[..., None]


class HeadsFirst:
    @staticmethod
    def queries(plan: Plan, x):
        return _heads_first(x, plan.t_pad)

    @staticmethod
    def keys(plan: Plan, x):
        return _heads_first(x, plan.s_pad)

    @staticmethod
    def key_rows(plan: Plan, x_BSH, fill):
        """[B,S,H] -> [B,H,1,Sp] fp32 for a float fill (the gate: -inf closes padded keys), else int32; fill is a
        value or EDGE (repeat the last key's)."""
        x = jnp.swapaxes(x_BSH, 1, 2)[:, :, None, :]
        pad = ((0, 0), (0, 0), (0, 0), (0, plan.s_pad - x.shape[-1]))
        if fill == EDGE:
            return jnp.pad(x, pad, mode="edge")
        x = x.astype(jnp.float32 if isinstance(fill, float) else jnp.int32)
        return jnp.pad(x, pad, constant_values=fill)

    @staticmethod
    def documents(plan: Plan, ids_BT, *, keys: bool):
        """[B,T] -> [B,1,Tp] (or Sp), edge-padded: each block's document range is as tight as its real rows (tiles
        are skipped by range). Padded query rows then see real keys, harmlessly: their outputs are cut and their
        cotangent is zero; padded keys are masked by position."""
        length = plan.s_pad if keys else plan.t_pad
        return jnp.pad(ids_BT, ((0, 0), (0, length - ids_BT.shape[1])), mode="edge")[:, None, :]

    @staticmethod
    def output(plan: Plan, o):
        return jnp.swapaxes(o[:, :, :plan.t], 1, 2)

    @staticmethod
    def lse_column(lse):
        return jnp.swapaxes(lse, -1, -2)


IN_PLACE, HEADS_FIRST = InPlace(), HeadsFirst()


def of(plan: Plan):
    return HEADS_FIRST if plan.pipeline else IN_PLACE


def _heads_first(x, length):
    """[B,T,H,X] -> [B,H,length,X], zero-padded."""
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))
