"""The train step of configs/bench/cpu_d512_l8.yaml in PyTorch eager, as the CPU yardstick for `attnlab bench step`.

Same model and step as the JAX one: 8 pre-norm blocks (RMSNorm, RoPE with half-split pairing, causal
attention through F.scaled_dot_product_attention, exact erf GELU MLP), d_model 512, 8 heads, MLP 2048,
no biases, tied embeddings, vocab 256, seq 512, batch 8, fp32; mean token cross-entropy, global-norm clip
1.0, AdamW (0.9, 0.95, eps 1e-8, weight decay 0.1 on matrices only). Tokens are uniformly random. MFU uses
the same analytic FLOPs (3x forward) and the same matmul-probe definition as the JAX bench (best of
512/1024/2048 square fp32 matmuls, at least 3 runs and 1 s each), measured here in torch; pass the JAX
probe with --jax-peak-gflops to also report MFU against it.

torch is not a project dependency. Run it from a throwaway venv:

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
    /tmp/torchvenv/bin/python experiments/bench/torch_step.py --steps 5 --json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

D_MODEL, N_LAYERS, N_HEADS, MLP_HIDDEN, VOCAB, SEQ, BATCH = 512, 8, 8, 2048, 256, 512, 8
NORM_EPS, ROPE_THETA, INIT_STD = 1e-5, 10000.0, 0.02


class RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + NORM_EPS) * self.scale


def rope_tables(seq: int, dim: int):
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.arange(seq, dtype=torch.float32)[:, None] * inv_freq
    return angles.cos(), angles.sin()  # [T, dim/2]


def apply_rope(x_BHTD, cos, sin):
    x1, x2 = x_BHTD.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, out_std: float):
        super().__init__()
        d = D_MODEL
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.up, self.down = nn.Linear(d, MLP_HIDDEN, bias=False), nn.Linear(MLP_HIDDEN, d, bias=False)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.up):
            nn.init.normal_(lin.weight, std=INIT_STD)
        for lin in (self.o_proj, self.down):
            nn.init.normal_(lin.weight, std=out_std)

    def forward(self, x_BTD, cos, sin):
        B, T, d = x_BTD.shape
        h = self.norm1(x_BTD)
        heads = lambda y: y.view(B, T, N_HEADS, d // N_HEADS).transpose(1, 2)
        q = apply_rope(heads(self.q_proj(h)), cos, sin)
        k = apply_rope(heads(self.k_proj(h)), cos, sin)
        o = F.scaled_dot_product_attention(q, k, heads(self.v_proj(h)), is_causal=True)
        x_BTD = x_BTD + self.o_proj(o.transpose(1, 2).reshape(B, T, d))
        return x_BTD + self.down(F.gelu(self.up(self.norm2(x_BTD))))


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        nn.init.normal_(self.embed.weight, std=INIT_STD)
        self.blocks = nn.ModuleList(Block(INIT_STD / math.sqrt(2 * N_LAYERS)) for _ in range(N_LAYERS))
        self.final_norm = RMSNorm(D_MODEL)
        cos, sin = rope_tables(SEQ, D_MODEL // N_HEADS)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, tokens_BT):
        T = tokens_BT.shape[1]
        x = self.embed(tokens_BT)
        for block in self.blocks:
            x = block(x, self.cos[:T], self.sin[:T])
        return self.final_norm(x) @ self.embed.weight.T


def flops_per_token_fwd(seq: int) -> float:
    """The JAX model's analytic forward FLOPs (LM.flops_per_token): projections, QK^T and PV over the
    (T + 1) / 2 keys a causal query sees on average, the MLP, and the tied head."""
    d, visible = D_MODEL, (seq + 1) / 2
    per_layer = 2 * d * 3 * d + 2 * d * d + 4 * d * visible + 2 * d * MLP_HIDDEN * 2
    return 2.0 * d * VOCAB + N_LAYERS * per_layer


def matmul_probe(n: int, seconds: float = 1.0) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best, reps, deadline = float("inf"), 0, time.perf_counter() + seconds
    while reps < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2.0 * n**3 / best


def make_step(model: LM, fused: bool):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.startswith("embed")]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and not n.startswith("embed"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=fused)

    def step(tokens):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    return step


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--fused-adamw", action="store_true", help="torch's fused AdamW kernel instead of foreach")
    ap.add_argument("--jax-peak-gflops", type=float, default=None,
                    help="the JAX bench's matmul_peak_gflops, to report MFU against it as well")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LM()
    step = make_step(model, args.fused_adamw)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen) for _ in range(2)]
    loss = step(batches[0])  # warm-up: allocator, optimizer state
    times, cpu = [], []
    for i in range(args.steps):
        t, c = time.perf_counter(), time.process_time()
        loss = step(batches[i % 2])
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    step_s = statistics.median(times)
    peak = max(matmul_probe(n) for n in (512, 1024, 2048))
    fwd = flops_per_token_fwd(SEQ)
    tps = BATCH * SEQ / step_s
    res = {
        "framework": f"torch {torch.__version__} eager", "threads": torch.get_num_threads(),
        "adamw": "fused" if args.fused_adamw else "foreach", "batch_size": BATCH, "seq_len": SEQ,
        "steps_timed": args.steps, "step_s_median": step_s, "step_s_min": min(times), "step_s_max": max(times),
        "cpu_s_median": statistics.median(cpu), "tokens_per_s": tps, "flops_per_token_fwd": fwd,
        "achieved_gflops": 3 * fwd * tps / 1e9, "matmul_peak_gflops": peak / 1e9, "mfu": 3 * fwd * tps / peak,
        "loss": loss.item(), "loadavg_1m": os.getloadavg()[0], "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "date": datetime.date.today().isoformat(),
    }
    if args.jax_peak_gflops:
        res["mfu_vs_jax_peak"] = res["achieved_gflops"] / args.jax_peak_gflops
    print(json.dumps(res) if args.json else "\n".join(f"{k}: {v}" for k, v in res.items()))
    return res


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
