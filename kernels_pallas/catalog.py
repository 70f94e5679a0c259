"""Every Pallas kernel at representative shapes, for lowering on any machine (`attnlab kernels lower`).

Each entry is one kernel family at one shape and feature set; lowering it runs the real Pallas -> Mosaic (TPU) or
Pallas -> Triton (GPU) lowering of its forward and backward kernels (the gradient is taken, so the backward
kernels lower too). A kernel that breaks a target's rules (TPU's (8, 128) blocks, Triton's power-of-two shapes,
an unsupported primitive) fails here, on the CPU machine, not in a cluster job.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from kernels_pallas import platform
from kernels_pallas.flash import KeyTransform, PagedKV, flash_attention, flash_decode
from kernels_pallas.kda import kda_attention
from kernels_pallas.lightning import lightning_attention


@dataclasses.dataclass(frozen=True)
class Case:
    kernel: str                      # the family: flash (training, fwd+bwd), decode, ...
    shape: str                       # what this entry covers, one line
    fn: Callable[..., Any]           # fn(*args) -> gradients (forward and backward kernels)
    args: tuple[jax.ShapeDtypeStruct, ...]


def _flash_case(dtype, d: int, variant: str, *, T: int = 2048, Hq: int = 8) -> Case:
    B = 1
    # "gqa4" (and any name not below): causal GQA with Hq / 4 KV heads.
    Hkv, window, local, gate, docs, shared, causal = Hq // 4, None, None, False, False, False, True
    if variant == "mha":
        Hkv = Hq
    elif variant == "mha-noncausal-ragged":
        Hkv, T, causal = Hq, 1000, False
    elif variant == "gqa4-k=v-window":
        shared, window = True, 512
    elif variant == "gqa4-gate-local":
        gate, local = True, 64
    elif variant == "mqa-segments-gate":
        Hkv, docs, gate = 1, True, True
    S = jax.ShapeDtypeStruct
    args = [S((B, T, Hq, d), dtype), S((B, T, Hkv, d), dtype)]
    args += [] if shared else [S((B, T, Hkv, d), dtype)]
    args += [S((B, T, Hkv), jnp.float32)] if gate else []
    args += [S((B, T), jnp.int32)] if docs else []

    def fn(*xs):
        xs = list(xs)
        q, k = xs.pop(0), xs.pop(0)
        v = None if shared else xs.pop(0)
        g = xs.pop(0) if gate else None
        ids = xs.pop(0) if docs else None

        def loss(q, k, v, g):
            o = flash_attention(q, k, v, causal=causal, sliding_window=window, local_window=local,
                                key_log_gate=g, doc_ids=ids)
            return jnp.sum(o.astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2, 3), allow_int=True)(q, k, v, g)

    name = f"{jnp.dtype(dtype).name} d{d} T{T} {variant}"
    return Case("flash", name, fn, tuple(args))


FLASH_VARIANTS = ("mha", "mha-noncausal-ragged", "gqa4-k=v-window", "gqa4-gate-local", "mqa-segments-gate")


def _decode_case(dtype, d: int, variant: str, *, S: int = 8192, B: int = 4, Hq: int = 32) -> Case:
    Hkv, shared, derive, held, paged = Hq // 4, False, False, False, False
    if variant == "gqa4-k=v-ragged":
        S, shared = 5000, True
    elif variant == "gqa4-k=v-norm-rope":
        shared, derive = True, True
    elif variant == "mqa":
        Hkv = 1
    elif variant == "gqa4-k=v-rope-pruned":  # an SP-KV cache: per-head lengths, no holes, keys rotated per slot
        S, shared, derive, held = 3136, True, True, True
    elif variant.endswith("-paged"):  # the pruned cache: a ring of 64 and a paged store of 52 pages of 64 per pair
        S, held, paged = 64, True, True
        shared = derive = "k=v-rope" in variant
    spec = jax.ShapeDtypeStruct
    args = [spec((B, 1, Hq, d), dtype), spec((B, S, Hkv, d), dtype)]
    args += [] if shared else [spec((B, S, Hkv, d), dtype)]
    args.append(spec((B, Hkv), jnp.int32) if held else spec((B, S, Hkv), jnp.float32))
    args += [spec((d,), jnp.float32), spec((B, S, Hkv), jnp.int32)] if derive else []
    page, n = 64, 52
    P = B * Hkv * n
    if paged:
        args += [spec((P, page, d), dtype)] + ([] if shared else [spec((P, page, d), dtype)])
        args += [spec((B, Hkv, n), jnp.int32), spec((B, Hkv), jnp.int32)]
        args += [spec((P, page), jnp.int32)] if derive else []

    def fn(*xs):
        q, k, *rest = xs
        v = None if shared else rest.pop(0)
        bias, lengths = (None, rest.pop(0)) if held else (rest.pop(0), None)
        kw = dict(lengths=lengths)
        if derive:
            norm_scale, pos = rest.pop(0), rest.pop(0)
            kw |= dict(key_transform=KeyTransform(norm_eps=1e-5, rope_theta=1e4), key_norm_scale=norm_scale,
                       key_positions=pos)
        if paged:
            pk = rest.pop(0)
            pv = None if shared else rest.pop(0)
            kw["pages"] = PagedKV(pk, pv, *rest)
        return flash_decode(q, k, v, bias, **kw)

    return Case("decode", f"{jnp.dtype(dtype).name} d{d} S{S} {variant}", fn, tuple(args))


DECODE_VARIANTS = ("gqa4", "gqa4-k=v-ragged", "gqa4-k=v-norm-rope", "mqa", "gqa4-k=v-rope-pruned", "gqa4-paged",
                   "gqa4-k=v-rope-paged")


def _chunked_dims(variant: str, T: int, H: int) -> tuple[int, int, int, bool]:
    """(B, T, H, with document ids) of a lightning/kda catalog variant."""
    return 1, T * 1000 // 2048 if variant == "ragged" else T, H, variant == "segments-h0"


def _lightning_case(dtype, d: int, variant: str, *, T: int = 2048, H: int = 8) -> Case:
    B, T, H, docs = _chunked_dims(variant, T, H)
    spec = jax.ShapeDtypeStruct
    args = [spec((B, T, H, d), dtype)] * 3 + [spec((H,), jnp.float32), spec((B, H, d, d), jnp.float32)]
    args += [spec((B, T), jnp.int32)] if docs else []

    def fn(q, k, v, lam, h0, *ids):
        def loss(q, k, v, lam, h0):
            o, final = lightning_attention(q, k, v, lam, initial_state=h0, doc_ids=ids[0] if ids else None)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, lam, h0)

    return Case("lightning", f"{jnp.dtype(dtype).name} d{d} T{T} {variant}", fn, tuple(args))


LIGHTNING_VARIANTS = ("plain", "ragged", "segments-h0")


def _kda_case(dtype, d: int, variant: str, *, T: int = 2048, H: int = 8) -> Case:
    B, T, H, docs = _chunked_dims(variant, T, H)
    spec = jax.ShapeDtypeStruct
    args = [spec((B, T, H, d), dtype)] * 3 + [spec((B, T, H, d), jnp.float32), spec((B, T, H), dtype),
                                              spec((B, H, d, d), jnp.float32)]
    args += [spec((B, T), jnp.int32)] if docs else []

    def fn(q, k, v, g, beta, h0, *ids):
        def loss(q, k, v, g, beta, h0):
            o, final = kda_attention(q, k, v, g, beta, initial_state=h0, doc_ids=ids[0] if ids else None)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

        return jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))(q, k, v, g, beta, h0)

    return Case("kda", f"{jnp.dtype(dtype).name} d{d} T{T} {variant}", fn, tuple(args))


def cases() -> list[Case]:
    grid = [(dt, d) for dt in (jnp.float32, jnp.bfloat16) for d in (64, 128)]
    return ([_flash_case(dt, d, v) for dt, d in grid for v in FLASH_VARIANTS]
            + [_decode_case(dt, d, v) for dt, d in grid for v in DECODE_VARIANTS]
            + [_lightning_case(dt, d, v) for dt, d in grid for v in LIGHTNING_VARIANTS]
            + [_kda_case(dt, d, v) for dt, d in grid for v in LIGHTNING_VARIANTS])


def report_cases(T: int) -> list[Case]:
    """One case per family at the shape the structure report and its targets are stated at: bf16, D=128, B=1,
    16 query heads (GQA 16/4 for flash and decode), T tokens (decode: one query over S=T cached keys; and a pruned
    cache's paged store, a fixed 52 pages of 64 keys per pair beside a ring of 64, whatever T)."""
    bf16 = jnp.bfloat16
    return [_flash_case(bf16, 128, "gqa4", T=T, Hq=16), _decode_case(bf16, 128, "gqa4", S=T, B=1, Hq=16),
            _decode_case(bf16, 128, "gqa4-paged", B=1, Hq=16),
            _lightning_case(bf16, 128, "plain", T=T, H=16), _kda_case(bf16, 128, "plain", T=T, H=16)]


def kernels() -> list[str]:
    return sorted({c.kernel for c in cases()})


def lower_all(target: str, only: str | None = None) -> Iterator[dict[str, Any]]:
    """Lower every catalogued case for `target` ('tpu', 'gpu' or 'cuda'); one result dict per case:
    kernel, shape, platform, ok, seconds, pallas_calls (kernels in the lowered program), error."""
    name = platform.normalize(target)
    marker = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton"}[name]
    for case in cases():
        if only is not None and case.kernel != only:
            continue
        t0 = time.perf_counter()
        result = dict(kernel=case.kernel, shape=case.shape, platform=name, ok=False, pallas_calls=0, error=None)
        try:
            text = platform.lower(case.fn, *case.args, platform=name).as_text()
            result["pallas_calls"] = text.count(marker)
            result["ok"] = result["pallas_calls"] > 0
            if not result["ok"]:
                result["error"] = f"the lowered program holds no {marker} call: the kernel did not lower as Pallas"
        except Exception as e:  # noqa: BLE001  (every failure is the result being reported)
            result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
        result["seconds"] = round(time.perf_counter() - t0, 2)
        yield result
