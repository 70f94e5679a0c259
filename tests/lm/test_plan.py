"""`attnlab plan`: the train step compiled for abstract shapes on a (simulated) mesh, with per-device parameter and
optimizer shards from the shardings and the compiler's own memory and FLOP account."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lm.plan import parse_mesh

SMALL = ["--set", "model.d_model=64", "--set", "model.n_layers=2", "--set", "model.mlp.hidden=128",
         "--set", "data.seq_len=32", "--set", "data.batch_size=8"]


def _plan(*args) -> dict:
    out = subprocess.run([sys.executable, "-m", "lm.cli", "plan", "configs/tiny/softmax.yaml", "--json", *args],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_parse_mesh():
    assert parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    assert parse_mesh(None) == {}
    for bad in ("data=0", "pipeline=2", "fsdp", "data=x"):
        with pytest.raises(ValueError, match="--mesh"):
            parse_mesh(bad)


def test_fsdp_divides_the_parameter_and_optimizer_shards():
    """In a fresh process (the simulated devices are set before jax starts): sharding parameters over fsdp=4
    leaves each device about a quarter of them; the compiled FLOPs match the analytic count."""
    one, four = _plan(*SMALL), _plan("--mesh", "data=2,fsdp=4", *SMALL)
    assert one["devices"] == 1 and four["devices"] == 8 and four["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    # Small leaves (norm scales, biases) that fsdp cannot split stay whole: between a quarter and a third.
    assert one["param_gib_per_device"] / 4 <= four["param_gib_per_device"] < one["param_gib_per_device"] / 3
    assert one["opt_gib_per_device"] / 4 <= four["opt_gib_per_device"] < one["opt_gib_per_device"] / 3
    assert 0.8 < one["compiled_over_analytic"] < 1.25
    assert four["analytic_tflops_per_device"] == pytest.approx(one["analytic_tflops_per_device"] / 8)
    assert four["temporaries_gib"] > 0 and four["peak_gib_per_device"] > four["param_gib_per_device"]


def test_bad_mesh_is_one_line(capsys):
    from lm.cli import main

    assert main(["plan", "configs/tiny/softmax.yaml", "--mesh", "data=two"]) == 2
    assert "--mesh: 'data=two' is not AXIS=N" in capsys.readouterr().err


def test_a_tensor_axis_that_does_not_divide_the_heads_is_said():
    """tensor=3 over 16 heads (and an MLP of 128, a vocab of 256) splits heads across devices and replicates the
    rest: the plan says so in its warnings (text: `warning:` lines; JSON: also on stderr)."""
    out = subprocess.run([sys.executable, "-m", "lm.cli", "plan", "configs/tiny/softmax.yaml", "--mesh", "tensor=3",
                          *SMALL, "--set", "model.mixers.softmax.n_heads=16", "--set", "model.d_model=96"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    warnings = [ln for ln in out if ln.startswith("warning:")]
    assert warnings == [
        "warning: mesh.tensor=3 does not divide the 16 heads and 16 kv heads of mixer softmax: each device holds part "
        "of a head; use a tensor size that divides the head counts",
        "warning: mesh.tensor=3 does not divide mlp 128, vocab 256: those weights are replicated on every tensor "
        "device instead of split"]
    ratio = next(ln for ln in out if ln.startswith("compiled_over_analytic:"))
    assert "XLA counts a loop's body once" in ratio
