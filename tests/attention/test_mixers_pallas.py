"""Mixers with impl="pallas" (the kernels, interpreted on the CPU) equal the same mixers on the reference ops:
the full forward with and without packed documents, and the token-by-token decode from a fresh cache or state
(softmax: dense, K=V with qk-norm and RoPE, GQA, window, SP-KV's pruned cache; CCA's latent attention;
lightning; kda, whose kernel is forward only)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention import MIXERS
from attention.base import MixerContext
from attention.cca import CCAConfig
from attention.softmax import SoftmaxConfig
from attention.spkv import SPKVConfig
from tests.attention.mixers import decode_all
from tests.numerics import assert_close

E, B, T = 32, 2, 20

CASES = {
    "mha-rope": SoftmaxConfig(n_heads=4),
    "gqa-k=v-qknorm": SoftmaxConfig(n_heads=4, n_kv_heads=2, share="kv", qk_norm=True),
    "mqa-window": SoftmaxConfig(n_heads=4, n_kv_heads=1, sliding_window=6),
    "gqa-spkv-pruned-cache": SoftmaxConfig(n_heads=4, n_kv_heads=2, spkv=SPKVConfig(window=4, init_bias=0.0)),
    "cca-gqa": CCAConfig(n_heads=4, n_kv_heads=2, head_dim=8),
    "cca-spkv": CCAConfig(n_heads=4, n_kv_heads=1, head_dim=8, spkv=SPKVConfig(window=4, init_bias=0.0)),
    "lightning": MIXERS["lightning"].config(kind="lightning", n_heads=4),
    "kda": MIXERS["kda"].config(kind="kda", n_heads=4),
}


def _mixer(cfg, impl):
    ctx = MixerContext(d_model=E, n_layers=2, layer_idx=0, seq_len=32, pos="rope", rope_theta=100.0, bias=False,
                       norm_eps=1e-5, init_std=0.2, out_std=0.2, dtype=jnp.float32, impl=impl)
    return MIXERS[cfg.kind].module(cfg, ctx, rngs=nnx.Rngs(0))


@nnx.jit
def _forward(m, x, positions, segment_ids):
    return m(x, positions=positions, segment_ids=segment_ids)


@pytest.mark.parametrize("name", list(CASES))
def test_pallas_mixer_equals_reference(name):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, E)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    seg = jnp.asarray(np.where(np.arange(T)[None] < np.array([[7], [13]]), 0, 1), jnp.int32)
    packed_pos = jnp.asarray(np.where(seg == 0, np.arange(T), np.arange(T) - np.array([[7], [13]])), jnp.int32)
    got, want = _mixer(CASES[name], "pallas"), _mixer(CASES[name], "reference")
    assert_close(_forward(got, x, positions, None), _forward(want, x, positions, None), rel=1e-5,
                 name=f"{name} forward")
    assert_close(_forward(got, x, packed_pos, seg), _forward(want, x, packed_pos, seg), rel=1e-5,
                 name=f"{name} packed forward")
    assert_close(decode_all(got, x), decode_all(want, x), rel=1e-5, name=f"{name} decode")
