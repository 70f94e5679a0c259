"""Shared harness for mixer tests: a MixerContext for hand-built mixers, the jitted full forward, the
token-by-token decode of a whole sequence, and a mixer's parameters as numpy arrays (read and written)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention.base import MixerContext


def context(d_model: int, *, layer_idx: int = 1, n_layers: int = 3, seq_len: int = 128, init_std: float = 0.2,
            bias: bool = False, impl: str = "auto") -> MixerContext:
    """fp32, no positions; init_std well above the model's 0.02 so every path carries signal."""
    return MixerContext(d_model=d_model, n_layers=n_layers, layer_idx=layer_idx, seq_len=seq_len, pos="none",
                        rope_theta=1e4, bias=bias, norm_eps=1e-5, init_std=init_std, out_std=init_std,
                        dtype=jnp.float32, impl=impl)


@nnx.jit
def forward(m, x_BTD, segment_ids):
    return m(x_BTD, positions=None, segment_ids=segment_ids)


@nnx.jit
def decode_all(m, x_BTD):
    """m.decode one token at a time from a fresh cache: outputs [B,T,D]."""
    B, T, _ = x_BTD.shape

    def step(cache, xs):
        x_BD, t = xs
        y, cache = m.decode(x_BD[:, None], cache, t)
        return cache, y[:, 0]

    _, y_TBD = jax.lax.scan(step, m.init_cache(B, T), (x_BTD.swapaxes(0, 1), jnp.arange(T)))
    return y_TBD.swapaxes(0, 1)


def xla_flops_per_token(m, x_BTD) -> float:
    """What XLA's cost analysis counts for the compiled forward, per token."""
    graph, state = nnx.split(m)
    fwd = jax.jit(lambda s, x: nnx.merge(graph, s)(x, positions=None))
    cost = fwd.lower(state, x_BTD).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"] / x_BTD.shape[1]


def params_of(m) -> dict:
    """The mixer's parameters as a nested dict of numpy arrays."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m, nnx.Param)))


def set_params(m, pure: dict) -> None:
    """Overwrite the mixer's parameters from a nested dict shaped like `params_of`'s."""
    state = nnx.state(m, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    nnx.update(m, state)
