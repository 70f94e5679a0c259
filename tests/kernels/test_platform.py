"""kernels_pallas.platform: one kernel body runs interpreted on the CPU and lowers for TPU (Mosaic) and GPU
(Triton) from this machine; a block shape that breaks a target's rules fails here, not on a cluster."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from kernels_pallas import platform

ROWS = {"cpu": 8, "gpu": 16, "tpu": 8}  # a per-target block table, as kernels keep them


def _axpy_kernel(x_ref, y_ref, o_ref):
    o_ref[...] = 2.0 * x_ref[...] + y_ref[...]


def axpy(x, y, *, block=None, block_cols=None, interpret=None):
    """2x + y over (row, column) blocks: the smallest kernel with a grid, block specs and per-target
    parameters."""
    rows, cols = block or platform.for_target(ROWS), block_cols or x.shape[1]
    spec = pl.BlockSpec((rows, cols), lambda i, j: (i, j))
    return pl.pallas_call(
        _axpy_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(x.shape[0] // rows, x.shape[1] // cols),
        in_specs=[spec, spec], out_specs=spec, interpret=platform.resolve_interpret(interpret),
        compiler_params=platform.compiler_params(gpu=dict(num_warps=4), tpu=dict(dimension_semantics=("parallel", "parallel"))),
    )(x, y)


def _xy(rows=32, cols=128):
    rng = np.random.default_rng(0)
    return tuple(jnp.asarray(rng.standard_normal((rows, cols), np.float32)) for _ in range(2))


on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU machine's own target")


@on_cpu
def test_interpret_on_cpu_matches_jnp():
    assert platform.target() == "cpu" and platform.resolve_interpret(None)
    x, y = _xy(cols=256)
    for cols in (None, 64):
        out = jax.jit(axpy, static_argnames="block_cols")(x, y, block_cols=cols)
        np.testing.assert_allclose(np.asarray(out), np.asarray(2 * x + y), rtol=1e-6)


@on_cpu
def test_targeting_picks_interpret_params_and_blocks():
    assert platform.compiler_params(gpu=dict(num_warps=4)) is None
    with platform.targeting("cuda") as t:
        assert t == "gpu" and not platform.resolve_interpret(None) and platform.resolve_interpret(True)
        assert isinstance(platform.compiler_params(gpu=dict(num_warps=4)), pltriton.CompilerParams)
        assert platform.for_target(ROWS) == 16
    with platform.targeting("tpu"):
        assert isinstance(platform.compiler_params(), pltpu.CompilerParams)
    assert platform.target() == "cpu"
    with pytest.raises(ValueError, match="unknown Pallas target 'metal'"):
        platform.targeting("metal").__enter__()
    with pytest.raises(KeyError, match="no entry for target"):
        platform.for_target({"gpu": 1})


@pytest.mark.parametrize("target, marker", [("tpu", "tpu_custom_call"), ("cuda", "triton")])
def test_lowers_for_tpu_and_gpu_from_this_machine(target, marker):
    x, y = _xy()
    text = platform.lower(axpy, x, y, platform=target).as_text()
    assert marker in text.lower()


def test_tpu_lowering_refuses_a_block_that_breaks_the_8_128_rule():
    x, y = _xy(cols=256)
    platform.lower(axpy, x, y, platform="tpu", block_cols=128)  # 128 columns: allowed
    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        platform.lower(axpy, x, y, platform="tpu", block_cols=64)


def test_gpu_lowering_refuses_a_block_that_is_not_a_power_of_two():
    x, y = _xy(rows=24, cols=128)
    with pytest.raises(Exception, match="(?i)power of 2|power-of-2|power of two"):
        platform.lower(axpy, x, y, platform="gpu", block=24)


def test_lower_refuses_cpu():
    with pytest.raises(ValueError, match="interpret mode"):
        platform.lower(axpy, *_xy(), platform="cpu")
