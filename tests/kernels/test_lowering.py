"""Every catalogued Pallas kernel (forward and backward) lowers for TPU (Mosaic) and GPU (Triton) on this CPU
machine, and `attnlab kernels lower` reports each kernel and shape on one line, failing when one does not lower."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from kernels_pallas import catalog, platform
from lm import cli

CASES = catalog.cases()


@pytest.mark.parametrize("target", ["tpu", "gpu"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c.kernel}-{c.shape}".replace(" ", "-") for c in CASES])
def test_kernel_lowers(case, target):
    marker = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton"}[target]
    text = platform.lower(case.fn, *case.args, platform=target).as_text()
    # The gradient's program holds the forward and backward kernels: flash's forward, dq and dk/dv (under SP-KV's
    # local window, once for the window's band and once for the compact keys);
    # lightning's state pass and output, then state pass, reverse pass and query/key gradients; kda's scores,
    # solve, state pass and output, then the same up to the state pass, the reverse pass, chunk and score
    # gradients; decode's one, and a second for a paged store.
    assert text.count(marker) == _calls(case, target)


def _calls(case, target):
    if case.kernel == "flash":
        return 6 if "gate-local" in case.shape else 3
    if case.kernel == "decode":
        return 2 if "paged" in case.shape else 1
    return {"lightning": 5, "kda": 10}[case.kernel]


def test_catalogue_covers_dtypes_head_dims_and_features():
    shapes = " ".join(c.shape for c in CASES)
    for needed in ("float32", "bfloat16", "d64", "d128", "gqa4", "k=v", "gate", "window", "segments", "ragged"):
        assert needed in shapes, f"no catalogued shape covers {needed}"
    assert {c.kernel for c in CASES} >= {"flash", "decode", "lightning", "kda"}


def test_cli_prints_one_line_per_kernel_and_shape(capsys):
    assert cli.main(["kernels", "lower", "--platform", "cuda", "--json", "--kernel", "flash"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["shape"] for r in lines] == [c.shape for c in CASES if c.kernel == "flash"]
    flash = {c.shape: c for c in CASES if c.kernel == "flash"}
    assert all(r["ok"] and r["platform"] == "gpu" and r["pallas_calls"] == _calls(flash[r["shape"]], "gpu")
               for r in lines)


def test_cli_fails_on_a_kernel_that_does_not_lower(monkeypatch, capsys):
    def bad(x):  # 24-row blocks: Triton needs powers of two
        spec = pl.BlockSpec((24, 128), lambda i: (i, 0))
        return pl.pallas_call(lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...]), grid=(2,), in_specs=[spec],
                              out_specs=spec, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                              compiler_params=platform.compiler_params(gpu=dict(num_warps=4)))(x)

    monkeypatch.setattr(catalog, "cases", lambda: [catalog.Case("bad", "24-row blocks", bad,
                                                                (jax.ShapeDtypeStruct((48, 128), jnp.float32),))])
    assert cli.main(["kernels", "lower", "--platform", "cuda"]) == 1
    out = capsys.readouterr()
    assert out.out.startswith("FAIL gpu bad") and "failed to lower" in out.err
    assert cli.main(["kernels", "lower", "--platform", "tpu", "--kernel", "nope"]) == 2
    assert "unknown kernel 'nope'" in capsys.readouterr().err
