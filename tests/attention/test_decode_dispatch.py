"""Every mixer's decode goes through op dispatch with the layer's `impl`: the choice is recorded under the
layer's label, for every implementation including the Pallas kernels. (An explicit pallas that cannot serve a
call raises instead of falling back: tests/kernels/test_flash.py and the ops' tests.)"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from attention import MIXERS
from attention.ops import dispatch
from tests.attention.mixers import context

D = 32
# The op each kind's decode uses.
DECODE_OPS = {"softmax": "softmax_decode", "cca": "softmax_decode", "kda": "kda", "lightning": "lightning"}
SETTINGS = {"softmax": dict(n_heads=4), "cca": dict(n_heads=4, n_kv_heads=2, head_dim=8),
            "kda": dict(n_heads=4), "lightning": dict(n_heads=4)}


def _decode_once(kind, impl):
    kind_ = MIXERS[kind]
    mixer = kind_.module(kind_.config(kind=kind, **SETTINGS[kind]), context(D, impl=impl), rngs=nnx.Rngs(0))
    x = jnp.ones((2, 1, D))
    with dispatch.label_calls(f"decode-test.{kind}.{impl}"):
        return jax.eval_shape(lambda: mixer.decode(x, mixer.init_cache(2, 8), jnp.int32(0)))


def test_every_kind_is_covered():
    assert set(DECODE_OPS) == set(MIXERS)


@pytest.mark.parametrize("kind", sorted(DECODE_OPS))
@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
def test_decode_records_the_layers_impl(kind, impl):
    _decode_once(kind, impl)
    chosen = {(label, c.op): c for label, c in dispatch.choices()}[(f"decode-test.{kind}.{impl}", DECODE_OPS[kind])]
    assert (chosen.requested, chosen.chosen) == (impl, impl)
    # An explicit pallas on the CPU runs the kernels interpreted; the run's implementation lines say so.
    assert ("run interpreted" in chosen.reason) == (impl == "pallas" and jax.default_backend() == "cpu")
