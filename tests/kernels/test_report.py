"""`attnlab kernels lower --report`: the structure read from a traced kernel is what the kernel holds (grid, dots and
their operand dtypes, loop trips, tile-padded VMEM per grid step), checked on a kernel built here by hand; and the
structure targets of the training kernels, checked on their report: TPU VMEM per grid step at most 16 MiB at
T=32768 and the same at T=8192, a declared VMEM limit; kda and lightning as chunk-parallel pipelines whose dots
are mostly on bf16 operands."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import catalog, platform
from lm import cli
from lm.bench import kernels as report


def _kernel(x_ref, w_ref, o_ref, acc_ref):
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def step(i, acc):   # 4 trips of a bf16 x bf16 -> fp32 dot [16,128] x [128,128]
        return acc + lax.dot_general(x_ref[...], w_ref[...], (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, 4, step, jnp.zeros((16, 128), jnp.float32))
    # One fp32 dot outside the loop: [8,16] x [16,128].
    o_ref[...] = lax.dot_general(acc[:8, :16], acc, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _call(x, w):
    return pl.pallas_call(
        _kernel, grid=(2, 3), name="hand_made",
        in_specs=[pl.BlockSpec((None, 16, 128), lambda i, j: (i, 0, 0)),
                  pl.BlockSpec((128, 128), lambda i, j: (0, 0))],
        out_specs=pl.BlockSpec((None, 8, 128), lambda i, j: (i * 3 + j, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((6, 8, 128), jnp.float32),
        scratch_shapes=[pltpu.VMEM((8, 1), jnp.float32)],
        compiler_params=platform.compiler_params(tpu=dict(dimension_semantics=("parallel", "parallel"))),
    )(x, w)


ARGS = (jax.ShapeDtypeStruct((2, 16, 128), jnp.bfloat16), jax.ShapeDtypeStruct((128, 128), jnp.bfloat16))


def test_structure_of_a_hand_made_kernel():
    [s] = report.kernel_structures(_call, *ARGS, target="tpu")
    assert s.name == "hand_made" and s.grid == (2, 3) and s.programs == 6
    assert [(d.lhs, d.rhs, d.acc) for d in s.dots] == [("bfloat16", "bfloat16", "float32"),
                                                        ("float32", "float32", "float32")]
    assert s.fast_dots == 1 and s.loops == [4]
    loop_flops, tail_flops = 4 * 2 * 16 * 128 * 128, 2 * 8 * 16 * 128
    assert [d.flops for d in s.dots] == [loop_flops, tail_flops]
    assert abs(s.fast_flop_share - loop_flops / (loop_flops + tail_flops)) < 1e-12
    # Blocks double-buffered, bf16 [16,128] = one (16,128) tile; fp32 [8,128] = one (8,128) tile; the scratch
    # [8,1] pads to a whole (8,128) tile, once.
    assert s.vmem_bytes == 2 * 16 * 128 * 2 + 2 * 128 * 128 * 2 + 2 * 8 * 128 * 4 + 8 * 128 * 4
    assert s.vmem_blocks[-1] == "8x1 float32 x1"


def test_gpu_structure_has_no_vmem():
    def gpu_call(x, w):  # no scratch: Triton has none
        def k(x_ref, w_ref, o_ref):
            o_ref[...] = lax.dot_general(x_ref[...], w_ref[...], (((1,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32)
        return pl.pallas_call(k, grid=(2,), in_specs=[pl.BlockSpec((None, 16, 128), lambda i: (i, 0, 0)),
                                                      pl.BlockSpec((128, 128), lambda i: (0, 0))],
                              out_specs=pl.BlockSpec((None, 16, 128), lambda i: (i, 0, 0)),
                              out_shape=jax.ShapeDtypeStruct((2, 16, 128), jnp.float32),
                              compiler_params=platform.compiler_params(gpu=dict(num_warps=4)))(x, w)

    [s] = report.kernel_structures(gpu_call, *ARGS, target="gpu")
    assert s.grid == (2,) and s.vmem_bytes == 0 and s.fast_dots == 1


def test_tile_padding():
    assert report._padded_bytes((2048, 1), jnp.float32) == 2048 * 128 * 4     # [T,1] statistics: 128x
    assert report._padded_bytes((10, 100), jnp.bfloat16) == 16 * 128 * 2
    assert report._padded_bytes((3, 10, 200), jnp.float32) == 3 * 16 * 256 * 4
    assert report._padded_bytes((128,), jnp.float32) == 8 * 128 * 4


def test_cli_report_rows(capsys):
    assert cli.main(["kernels", "lower", "--report", "--T", "512", "--kernel", "lightning", "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {r["target"] for r in rows} == {"tpu", "gpu"} and {r["family"] for r in rows} == {"lightning"}
    for r in rows:
        assert r["T"] == 512 and r["programs"] >= 1 and r["dots"] >= 1
        assert (r["vmem_bytes"] > 0) == (r["target"] == "tpu")
    assert cli.main(["kernels", "lower", "--report", "--T", "512", "--kernel", "kda", "--platform", "tpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(x.startswith("tpu T=512") and "MiB/step" in x for x in lines)
    assert cli.main(["kernels", "lower", "--report", "--T", "0"]) == 2
    assert cli.main(["kernels", "lower"]) == 2
    assert "needs --platform" in capsys.readouterr().err


# ---- the structure targets of the training kernels (bf16, B=1, H=16, D=128; flash GQA 16/4) -------------------

LINEAR = ("kda", "lightning")
TRAINING = ("flash",) + LINEAR


@pytest.fixture(scope="module")
def linear_rows():
    return [r for fam in TRAINING for r in report.report_rows((8192, 32768), only=fam)]


def _rows(rows, family, target, T):
    return [r for r in rows if r["family"] == family and r["target"] == target and r["T"] == T]


@pytest.mark.parametrize("family", TRAINING)
def test_tpu_vmem_is_bounded_and_does_not_grow_with_T(linear_rows, family):
    short, long_ = _rows(linear_rows, family, "tpu", 8192), _rows(linear_rows, family, "tpu", 32768)
    assert [r["name"] for r in short] == [r["name"] for r in long_] and short
    for a, b in zip(short, long_):
        assert b["vmem_bytes"] <= report.VMEM_BOUND_BYTES, f"{b['name']}: {b['vmem_bytes'] / 2**20:.1f} MiB"
        assert a["vmem_bytes"] == b["vmem_bytes"], f"{a['name']}: VMEM per grid step grows with T"
        assert b["vmem_limit_bytes"] and b["vmem_bytes"] <= b["vmem_limit_bytes"], f"{b['name']} sets no VMEM limit"


def test_tpu_decode_vmem_is_bounded_at_any_cache_length():
    """The decode kernels copy a split of the cache whole into VMEM: past 2048 keys a longer cache gets more splits,
    not larger ones, so VMEM per grid step is the same at 32k and 128k keys (it grew 4x from 8k to 32k before)."""
    rows = list(report.report_rows((32768, 131072), only="decode", targets=("tpu",)))
    by_T = {T: [(r["name"], r["vmem_bytes"]) for r in rows if r["T"] == T] for T in (32768, 131072)}
    assert by_T[32768] == by_T[131072] and {n for n, _ in by_T[32768]} == {"flash_decode", "flash_decode_paged"}
    for r in rows:
        assert r["vmem_bytes"] <= 4 << 20 and r["vmem_limit_bytes"] == report.VMEM_BOUND_BYTES, r


@pytest.mark.parametrize("target", ["tpu", "gpu"])
@pytest.mark.parametrize("family", LINEAR)
def test_linear_kernels_are_chunk_parallel_tensor_core_pipelines(linear_rows, family, target):
    rows = _rows(linear_rows, family, target, 8192)
    chunks = 8192 // {"tpu": 128 if family == "lightning" else 64, "gpu": 64}[target]
    for r in rows:
        sequential = r["name"].endswith("_pass")
        # Every kernel but the passes over chunks has a program per (head, chunk) at least; the passes split V
        # (on GPU) so they have more programs than heads, and only they loop over chunks.
        if sequential:
            assert r["programs"] >= (16 * chunks if target == "tpu" else 32), r
            assert all(n <= 16 or n == chunks for n in r["loops"]), r
        else:
            assert r["programs"] >= max(1024, 16 * chunks), r
            assert all(0 < n <= 16 for n in r["loops"]), f"{r['name']} loops over more than a 16-row block: {r}"
    dots = sum(r["dots"] for r in rows)
    assert 3 * sum(r["dots_bf16_fp32acc"] for r in rows) >= 2 * dots, "fewer than 2/3 of the dots take bf16 operands"


def test_linear_forward_kernels_compile_without_spills():
    """Every forward kernel of kda and lightning compiles for sm_90a (ptxas from the triton wheel) without register
    spills, at the report's shapes (T shortened: only loop bounds depend on it)."""
    assert report.ptxas_available(), "the test extra installs triton, whose ptxas this check needs"
    forward = {"kda_scores", "kda_solve", "kda_state_pass", "kda_output", "lightning_state_pass", "lightning_output"}
    spills, seen = {}, set()
    for case in catalog.report_cases(1024):
        if case.kernel not in LINEAR:
            continue
        for name, ir, warps, stages in report.triton_modules(case.fn, *case.args):
            if name in forward and name not in seen:
                seen.add(name)
                spills[name] = report.ptxas_usage(ir, warps, stages)["spill_store_bytes"]
    assert spills == dict.fromkeys(forward, 0)
