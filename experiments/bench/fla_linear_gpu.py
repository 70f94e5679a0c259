"""GPU only, PyTorch side: forward+backward time of flash-linear-attention's Triton kernels `chunk_kda` and
`chunk_simple_gla` (lightning's semantics: a per-head decay g_gamma), at the shapes `lm.bench.ops` times ours,
so the GPU suite can set our Pallas kernels against them. Needs torch with CUDA and fla-core (a pure-Python
wheel; experiments/bench/gpu_wheels.sh fetches it). Imports no JAX and nothing of this project.

    python3 experiments/bench/fla_linear_gpu.py --T 1024 4096 16384 --B 2 --H 16 --D 128 --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args(argv)
    import torch
    import torch.nn.functional as F
    from fla.ops.kda import chunk_kda
    from fla.ops.simple_gla import chunk_simple_gla

    dev, bf16 = "cuda", torch.bfloat16
    rows = []
    for T in a.T:
        shape = (a.B, T, a.H, a.D)
        q, k, v = (torch.randn(shape, device=dev, dtype=bf16, requires_grad=True) for _ in range(3))
        g = (-F.softplus(torch.randn(shape, device=dev)) * 0.1).to(bf16).requires_grad_()
        beta = torch.rand(a.B, T, a.H, device=dev, dtype=bf16).requires_grad_()
        gamma = -torch.linspace(0.01, 1.0, a.H, device=dev)
        qn, kn = F.normalize(q.detach().float(), dim=-1).to(bf16).requires_grad_(), \
            F.normalize(k.detach().float(), dim=-1).to(bf16).requires_grad_()
        cases = {"fla.chunk_kda": lambda: chunk_kda(qn, kn, v, g, beta)[0],
                 "fla.chunk_simple_gla": lambda: chunk_simple_gla(q, k, v, g_gamma=gamma)[0]}
        for name, fwd in cases.items():
            def step():
                fwd().float().sum().backward()
            try:
                step()
                torch.cuda.synchronize()
                times = []
                for _ in range(a.reps):
                    t0 = time.perf_counter()
                    step()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                row = dict(op=name, T=T, B=a.B, H=a.H, D=a.D, dtype="bfloat16",
                           fwd_bwd_ms=statistics.median(times) * 1e3)
            except Exception as e:  # noqa: BLE001  (a kernel that cannot run is reported)
                row = dict(op=name, T=T, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
