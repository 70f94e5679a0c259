"""Analytic FLOPs and model FLOPs utilisation (MFU).

Forward FLOPs per token come from each mixer's `flops_per_token(seq_len)` plus the MLPs and the output
head (`LM.flops_per_token`); a training step costs 3x the forward (forward + 2x backward). MFU is
achieved FLOP/s divided by the peak: `hardware.peak_tflops` from the config, else a table of known
accelerators (dense bf16), else on CPU a matmul probe measured once per machine and kept in
~/.cache/attnlab/peak_flops.json (ATTNLAB_CACHE_DIR moves it; delete the file to measure again), so MFU does
not swing with how busy the machine was when a run started.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

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


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_file() -> Path:
    root = os.environ.get("ATTNLAB_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attnlab"
    return Path(root) / "peak_flops.json"


def cached_cpu_peak(dtype) -> tuple[float, str]:
    """The CPU matmul peak for this machine, jax version and dtype: from the cache file, or measured (best of
    a 2 s probe) and stored there."""
    key = f"{cpu_model()} x{os.cpu_count()} | jax {jax.__version__} | {jnp.dtype(dtype).name}"
    path = _cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        hit = cache[key]
        return float(hit["flops"]), f"{jnp.dtype(dtype).name} matmul peak measured {hit['date']}, cached in {path}"
    flops = matmul_probe(dtype=dtype, seconds=2.0)
    cache[key] = {"flops": flops, "date": datetime.date.today().isoformat()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)
        where = f"cached in {path}"
    except OSError as e:
        where = f"not cached: {e.strerror}"
    return flops, f"{jnp.dtype(dtype).name} matmul peak measured now (1024^3 probe), {where}"


def peak_flops(peak_tflops: float | None = None, dtype=jnp.float32) -> tuple[float, str]:
    """(peak FLOP/s per device, where the number came from)."""
    if peak_tflops:
        return peak_tflops * 1e12, "config hardware.peak_tflops"
    dev = jax.devices()[0]
    table = table_peak_flops(dev)
    if table is not None:
        return table, f"table ({dev.device_kind}, dense bf16)"
    if dev.platform == "cpu":
        return cached_cpu_peak(dtype)
    raise ValueError(f"no peak FLOP/s known for {dev.device_kind}; set hardware.peak_tflops in the config")
