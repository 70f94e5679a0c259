"""Analytic FLOPs and model FLOPs utilisation (MFU).

Forward FLOPs per token come from each mixer's `flops_per_token(seq_len)` plus the MLPs and the output
head (`LM.flops_per_token`); a training step costs 3x the forward (forward + 2x backward). MFU is
achieved FLOP/s divided by the peak: `hardware.peak_tflops` from the config, else a table of known
accelerators (dense bf16), else on CPU a short matmul probe.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense bf16 peak TFLOP/s per chip (vendor datasheets; SXM parts for NVIDIA).
PEAK_TFLOPS = {
    "h100": 989.0,
    "h200": 989.0,
    "a100": 312.0,
    "tpu v4": 275.0,
    "tpu v5 lite": 197.0,  # v5e
    "tpu v5e": 197.0,
    "tpu v5p": 459.0,
    "tpu v5": 459.0,
    "tpu v6 lite": 918.0,  # v6e (Trillium)
    "tpu v6e": 918.0,
}

_probe_cache: dict[str, float] = {}


def train_flops_per_token(fwd_flops_per_token: float) -> float:
    return 3.0 * fwd_flops_per_token


def table_peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "").lower()
    for name, tflops in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if name in kind:
            return tflops * 1e12
    return None


def matmul_probe(n: int = 1024, dtype=jnp.float32, seconds: float = 1.0) -> float:
    """Best observed FLOP/s of an n x n matmul on the default device (cached per process)."""
    key = f"{jax.default_backend()}:{n}:{jnp.dtype(dtype).name}"
    if key in _probe_cache:
        return _probe_cache[key]
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    reps = 0
    while reps < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    _probe_cache[key] = 2.0 * n**3 / best
    return _probe_cache[key]


def peak_flops(peak_tflops: float | None = None, dtype=jnp.float32) -> tuple[float, str]:
    """(peak FLOP/s per device, where the number came from)."""
    if peak_tflops:
        return peak_tflops * 1e12, "config hardware.peak_tflops"
    dev = jax.devices()[0]
    table = table_peak_flops(dev)
    if table is not None:
        return table, f"table ({dev.device_kind}, dense bf16)"
    if dev.platform == "cpu":
        return matmul_probe(dtype=dtype), f"measured {jnp.dtype(dtype).name} matmul peak (1024^3 probe)"
    raise ValueError(f"no peak FLOP/s known for {dev.device_kind}; set hardware.peak_tflops in the config")
