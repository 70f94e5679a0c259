"""Peer check, not a test: our KDA *layer* (`attention.kda.KimiDeltaAttention`) against flash-linear-attention's
`fla/layers/kda.py` with the same weights: projections, short convolutions, gate and beta parametrisation,
L2 norms, the op, the gated output norm and the output projection, end to end.

    python experiments/bench/check_fla_kda_layer.py FLA_ROOT [--torch-python PY]

FLA_ROOT is a checkout of flash-linear-attention (fla is not a dependency of this project); PY an interpreter
with torch and einops. fla's layer file and its `layers/utils.py` run unchanged. Its Triton pieces cannot run on
a CPU, so the torch side stands them in with their documented semantics, written here:
- `fla.ops.kda.chunk_kda` / `fused_recurrent_kda` with `use_qk_l2norm_in_kernel`, `use_gate_in_kernel` and
  `use_beta_sigmoid_in_kernel`: q, k L2-normalised (x / sqrt(sum x^2 + 1e-6)), g = -exp(A_log) *
  softplus(g + dt_bias), beta = sigmoid(beta), then fla's own `naive_recurrent_kda` (loaded from FLA_ROOT);
- `fla.modules.ShortConvolution`: the depthwise causal `nn.Conv1d` it subclasses, then SiLU;
- `fla.modules.FusedRMSNormGated(activation="sigmoid")`: RMSNorm(x) * weight * sigmoid(g).
So what is compared is fla's layer wiring (shapes, order, parametrisation) around those primitives.

fla's `g_proj` ends in a Linear with a bias; ours has one only with `model.bias: true` (the Kimi Linear release has
none), so its bias is set to zero here and the difference is reported, not hidden.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from experiments.bench.peer_check import load_module, run_torch_side  # noqa: E402

# name: (B, T, d_model, heads, head_dim, conv_size)
CASES = {"h2_d64_t100": (2, 100, 64, 2, 32, 4), "h4_d128_t70": (1, 70, 128, 4, 32, 3)}


# ---------------------------------------------------------------------------------------------- torch side


def _torch_stubs(fla_root: str):
    """Install the stand-ins for fla's Triton pieces and load fla's layer files by path."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def package(name):
        module = types.ModuleType(name)
        module.__path__ = []
        sys.modules[name] = module
        return module

    for name in ("fla", "fla.ops", "fla.ops.utils", "fla.layers"):
        package(name)
    utils = types.ModuleType("fla.utils")
    utils.tensor_cache = lambda fn: fn
    sys.modules["fla.utils"] = utils
    index = types.ModuleType("fla.ops.utils.index")
    index.prepare_cu_seqlens_from_mask = index.prepare_lens_from_mask = None
    sys.modules["fla.ops.utils.index"] = index

    naive = load_module(os.path.join(fla_root, "fla/ops/kda/naive.py"), "fla_kda_naive")

    def kda_op(q, k, v, g, beta, A_log, dt_bias, initial_state=None, output_final_state=False,
               use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False,
               allow_neg_eigval=False, cu_seqlens=None, **_):
        assert use_qk_l2norm_in_kernel and use_gate_in_kernel and use_beta_sigmoid_in_kernel and cu_seqlens is None
        l2 = lambda x: x / torch.sqrt((x.float() ** 2).sum(-1, keepdim=True) + 1e-6)  # noqa: E731
        H, K = g.shape[-2:]
        gate = -A_log.float().exp()[:, None] * F.softplus(g.float() + dt_bias.float().view(H, K))
        b = beta.float().sigmoid() * (2 if allow_neg_eigval else 1)
        return naive.naive_recurrent_kda(l2(q), l2(k), v, gate, b, initial_state=initial_state,
                                         output_final_state=output_final_state)

    ops_kda = types.ModuleType("fla.ops.kda")
    ops_kda.chunk_kda = ops_kda.fused_recurrent_kda = kda_op
    sys.modules["fla.ops.kda"] = ops_kda

    class ShortConvolution(nn.Conv1d):
        def __init__(self, hidden_size, kernel_size, bias=False, activation="silu", **_):
            super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, padding=kernel_size - 1,
                             bias=bias)
            assert activation == "silu"

        def forward(self, x, cache=None, output_final_state=False, cu_seqlens=None, **_):
            assert cache is None and cu_seqlens is None
            y = super().forward(x.transpose(1, 2))[..., :x.shape[1]]
            return F.silu(y).transpose(1, 2), None

    class FusedRMSNormGated(nn.Module):
        def __init__(self, hidden_size, activation="swish", eps=1e-5, **_):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(hidden_size))
            self.eps, self.activation = eps, activation

        def forward(self, x, g):
            assert self.activation == "sigmoid"
            x32 = x.float()
            y = x32 * torch.rsqrt((x32 * x32).mean(-1, keepdim=True) + self.eps) * self.weight
            return (y * g.float().sigmoid()).to(x.dtype)

    modules = types.ModuleType("fla.modules")
    modules.ShortConvolution, modules.FusedRMSNormGated = ShortConvolution, FusedRMSNormGated
    sys.modules["fla.modules"] = modules
    sys.modules["fla.layers.utils"] = load_module(os.path.join(fla_root, "fla/layers/utils.py"), "fla.layers.utils")
    return load_module(os.path.join(fla_root, "fla/layers/kda.py"), "fla.layers.kda")


def torch_side(fla_root: str, in_path: str, out_path: str) -> None:
    import torch

    torch.set_default_dtype(torch.float32)
    layer_mod = _torch_stubs(fla_root)
    arrays = dict(np.load(in_path))
    out = {}
    for name, (B, T, D, H, hd, W) in CASES.items():
        p = {key[len(name) + 1:]: val for key, val in arrays.items() if key.startswith(name + "/")}
        layer = layer_mod.KimiDeltaAttention(hidden_size=D, head_dim=hd, num_heads=H, conv_size=W, layer_idx=0)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        with torch.no_grad():
            for proj in ("q", "k", "v"):
                getattr(layer, f"{proj}_proj").weight.copy_(t(p[f"{proj}_proj"].T))
                # ours [W, C] with the last tap on x_t; Conv1d [C, 1, W] cross-correlates the same way
                getattr(layer, f"{proj}_conv1d").weight.copy_(t(p[f"{proj}_conv"].T[:, None, :]))
            layer.f_proj[0].weight.copy_(t(p["f_a"].T))
            layer.f_proj[1].weight.copy_(t(p["f_b"].T))
            layer.b_proj.weight.copy_(t(p["b_proj"].T))
            layer.g_proj[0].weight.copy_(t(p["g_a"].T))
            layer.g_proj[1].weight.copy_(t(p["g_b"].T))
            layer.g_proj[1].bias.zero_()
            layer.A_log.copy_(t(p["A_log"]))
            layer.dt_bias.copy_(t(p["dt_bias"]))
            layer.o_norm.weight.copy_(t(p["o_norm"]))
            layer.o_proj.weight.copy_(t(p["o_proj"].T))
            y, _, _ = layer(t(p["x"]))
        out[f"{name}/y"] = y.numpy()
    np.savez(out_path, **out)


# ------------------------------------------------------------------------------------------------ jax side


def our_side() -> tuple[dict, dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from attention.base import MixerContext
    from attention.kda import KDAConfig, KimiDeltaAttention

    arrays, ours = {}, {}
    for n, (name, (B, T, D, H, hd, W)) in enumerate(CASES.items()):
        ctx = MixerContext(d_model=D, n_layers=1, layer_idx=0, seq_len=T, pos="none", rope_theta=1e4, bias=False,
                           norm_eps=1e-5, init_std=0.2, out_std=0.2, dtype=jnp.float32, impl="reference")
        layer = KimiDeltaAttention(KDAConfig(n_heads=H, head_dim=hd, conv_size=W), ctx, rngs=nnx.Rngs(n))
        # A trained-looking output norm scale, not the ones it starts at.
        layer.o_norm.scale.value = 1.0 + 0.3 * jax.random.normal(jax.random.PRNGKey(100 + n), (hd,))
        x = np.random.default_rng(n).standard_normal((B, T, D)).astype(np.float32)
        for impl in ("reference", "xla", "pallas"):
            layer.ctx = dataclasses.replace(ctx, impl=impl)
            ours[(name, impl)] = {"y": np.asarray(layer(jnp.asarray(x), positions=None))}
        params = {"q_proj": layer.q_proj.kernel, "k_proj": layer.k_proj.kernel, "v_proj": layer.v_proj.kernel,
                  "q_conv": layer.q_conv, "k_conv": layer.k_conv, "v_conv": layer.v_conv, "f_a": layer.f_a.kernel,
                  "f_b": layer.f_b.kernel, "b_proj": layer.b_proj.kernel, "g_a": layer.g_a.kernel,
                  "g_b": layer.g_b.kernel, "A_log": layer.A_log, "dt_bias": layer.dt_bias,
                  "o_norm": layer.o_norm.scale, "o_proj": layer.o_proj.kernel}
        arrays.update({f"{name}/{key}": np.asarray(val[...], np.float32) for key, val in params.items()})
        arrays[f"{name}/x"] = x
    return arrays, ours


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fla_root", help="a checkout of flash-linear-attention")
    p.add_argument("--torch-python", default=sys.executable, help="an interpreter with torch and einops")
    p.add_argument("--torch-side", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.torch_side:
        torch_side(a.fla_root, *a.torch_side)
        return 0
    arrays, ours = our_side()
    fla = run_torch_side(a.torch_python, __file__, [a.fla_root], arrays)
    worst = 0.0
    print(f"{'case':14s} {'impl':9s} {'max|diff|':>10s} {'rel-RMSE':>10s}   (layer output y against fla's layer)")
    for (name, impl), res in ours.items():
        ref = fla[f"{name}/y"].astype(np.float64)
        diff = res["y"].astype(np.float64) - ref
        rel = float(np.sqrt(np.mean(diff ** 2) / np.mean(ref ** 2)))
        worst = max(worst, rel)
        print(f"{name:14s} {impl:9s} {np.abs(diff).max():10.2e} {rel:10.2e}")
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
