"""`attnlab bench step CONFIG`: train-step throughput and MFU of a config on synthetic tokens.

The step is the real training step (same jit, same optimizer, same sharding) fed uniformly random
tokens, so the number measures compute, not the data pipeline. MFU divides achieved model FLOP/s
(3x analytic forward FLOPs per token) by the per-device peak: `hardware.peak_tflops`, the accelerator
table, or on CPU the best of a short matmul probe at a few sizes (reported as matmul_peak_gflops).
"""
from __future__ import annotations

import datetime
import os
import platform
import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lm import flops as lmflops
from lm import runtime
from lm.config import load_config
from lm.model import count_params
from lm.train.setup import build
from lm.train.step import make_train_step


def machine() -> dict:
    cpu = lmflops.cpu_model()
    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
            "n_devices": jax.device_count(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "jax": jax.__version__,
            "host_malloc": "kept" if runtime.host_memory_kept() else "system",
            "date": datetime.date.today().isoformat()}


def cpu_matmul_peak(dtype=jnp.float32) -> float:
    return max(lmflops.matmul_probe(n, dtype, seconds=1.0) for n in (512, 1024, 2048))


def bench_step(config: str, overrides: list[str], *, steps: int = 5, write: str | None = None) -> dict:
    cfg = load_config(config, overrides)
    setup = build(cfg)
    step_fn = make_train_step(cfg, setup.mdef, setup.tx, setup.schedule)
    state = jax.jit(setup.fresh_state, out_shardings=setup.state_sh)()
    B, T, V = cfg.data.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    rng = np.random.default_rng(0)
    batches = [jax.device_put({"tokens": rng.integers(0, V, (B, T + 1), dtype=np.int32)}, setup.batch_sh)
               for _ in range(2)]
    t0 = time.perf_counter()
    compiled = jax.jit(step_fn, in_shardings=(setup.state_sh, setup.batch_sh), out_shardings=(setup.state_sh, None),
                       donate_argnums=(0,)).lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, batches[0])  # warm-up
    jax.block_until_ready(m)
    times, faults, sys_s = [], [], []
    for i in range(steps):
        ru, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        state, m = compiled(state, batches[i % 2])
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(after.ru_minflt - ru.ru_minflt)
        sys_s.append(after.ru_stime - ru.ru_stime)
    step_s = float(np.median(times))
    model = setup.mdef.merge(setup.state_shapes["params"])
    fwd = model.flops_per_token(T)
    tps = B * T / step_s
    n_dev = setup.mesh.devices.size
    compute_dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
    if jax.default_backend() == "cpu" and not cfg.hardware.peak_tflops:
        peak, src = cpu_matmul_peak(compute_dtype), "measured matmul peak (best of 512/1024/2048 probes)"
    else:
        peak, src = lmflops.peak_flops(cfg.hardware.peak_tflops, compute_dtype)
    res = {
        "config": config, "overrides": list(overrides), "params": count_params(setup.state_shapes["params"]),
        "batch_size": B, "seq_len": T, "tokens_per_step": B * T, "steps_timed": steps,
        "step_s_median": step_s, "step_s_min": float(min(times)), "compile_s": compile_s,
        # Host-side cost of the step's memory: minor page faults and kernel CPU time (all threads) per step.
        "page_faults_per_step": int(np.median(faults)), "kernel_cpu_s_per_step": float(np.median(sys_s)),
        "tokens_per_s": tps, "flops_per_token_fwd": fwd, "train_flops_per_step": 3 * fwd * B * T,
        "achieved_gflops": 3 * fwd * tps / 1e9, "matmul_peak_gflops": peak / 1e9, "peak_source": src,
        "mfu": 3 * fwd * tps / (peak * n_dev), "loss": float(m["loss"]), **machine(),
    }
    if write:
        write_markdown(Path(write), res)
    return res


def write_markdown(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in res.items())
    path.write_text(f"# Train-step benchmark: {res['config']}\n\n"
                    f"Command: `attnlab bench step {res['config']} --steps {res['steps_timed']}"
                    f"{''.join(' --set ' + o for o in res['overrides'])}`\n\n| metric | value |\n|---|---|\n{rows}\n")
