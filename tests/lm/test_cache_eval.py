"""`attnlab eval RUN --decode --cache-policy P --cache-budget B`: the held-out loss through pruned caches beside the
full forward's, recall through them, their bytes, and the requests it refuses. Tiny runs: seq_len 32, 2 layers,
2 KV heads of 16 dims."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lm.cli import main
from lm.config import load_config
from lm.train import train
from tests.lm.conftest import tiny_overrides

SPKV = {"model.mixers.softmax.spkv.window": 8, "model.mixers.softmax.spkv.init_bias": 0.0,
        "model.mixers.softmax.spkv.anneal": "null", "train.steps": 2, "train.eval_steps": 1}


@pytest.fixture(scope="module")
def spkv_run(small_store, tmp_path_factory):
    res = train(load_config("configs/tiny/spkv.yaml", tiny_overrides(small_store, tmp_path_factory.mktemp("r"),
                                                                     "spkv", **SPKV)))
    return str(res.run_dir)


@pytest.fixture(scope="module")
def softmax_run(small_store, tmp_path_factory):
    res = train(load_config("configs/tiny/softmax.yaml", tiny_overrides(
        small_store, tmp_path_factory.mktemp("r"), "softmax", **{"train.steps": 2, "train.eval_steps": 1})))
    return str(res.run_dir)


def _eval(capsys, run, *flags) -> dict:
    assert main(["eval", run, "--json", "--batches", "1", "--decode", "--decode-batch", "1", "--decode-steps", "2",
                 "--decode-repeats", "1", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_spkv_policy_at_its_own_capacity_is_the_hard_mask_forward(capsys, spkv_run):
    """No budget: the run's own pruned cache, which holds every kept key, so the loss through it is the full
    forward's (whose gate outside training is the hard mask) on the same tokens."""
    res = _eval(capsys, spkv_run, "--cache-policy", "spkv")
    c = res["cache"]
    assert c["policy"] == "spkv" and c["budget"] is None and c["tokens"] == res["eval_tokens"] == 4 * 32
    assert c["full_loss"] == res["eval_loss"] and abs(c["loss_delta"]) < 1e-4, c
    assert c["layers"] == {"layer0.softmax": {"window": 8, "store": 24}, "layer1.softmax": {"window": 8, "store": 24}}
    assert c["evicted_per_sequence"] == 0 and 0 < c["held_kv_bytes_per_sequence"] <= c["dense_kv_bytes_per_sequence"]
    assert res["decode"]["pruned"]["held_kv_bytes_per_sequence"] > 0


@pytest.mark.parametrize("policy", ["spkv", "sink-window", "h2o", "random"])
def test_every_policy_at_a_budget(capsys, spkv_run, policy):
    """Budget 12 of 32 tokens: each layer and KV head holds 12 keys at the end of a sequence (the spkv policy at
    most 12: its gate also drops keys); the loss is through those caches."""
    res = _eval(capsys, spkv_run, "--cache-policy", policy, "--cache-budget", "12")
    c = res["cache"]
    kv = 16 * 4 * 2  # K and V of 16 dims in fp32: bytes per key of one KV head
    held = c["held_kv_bytes_per_sequence"] / (2 * 2 * kv)  # per layer and KV head
    assert held <= 12 and (held == 12 or policy == "spkv"), held
    assert c["dense_kv_bytes_per_sequence"] == 2 * 2 * 32 * kv
    assert c["loss"] > 0 and c["tokens"] == 4 * 32
    window = 8 if policy != "sink-window" else 12 - 4
    assert c["layers"]["layer0.softmax"] == {"window": window, "store": 12 - window}
    if policy != "spkv":
        assert c["evicted_per_sequence"] == 2 * 2 * (32 - 12)  # every layer and head drops 20 keys


def test_a_budget_that_holds_everything_is_the_full_forward(capsys, softmax_run):
    res = _eval(capsys, softmax_run, "--cache-policy", "h2o", "--cache-budget", "32")
    full = abs(res["cache"]["loss_delta"])
    assert full < 1e-4 and res["cache"]["evicted_per_sequence"] == 0
    small = _eval(capsys, softmax_run, "--cache-policy", "h2o", "--cache-budget", "4", "--cache-window", "2")
    assert small["cache"]["layers"]["layer0.softmax"] == {"window": 2, "store": 2}
    # A 2-step model attends almost uniformly, so dropping 28 of 32 keys moves the loss little (1.6e-4 on one
    # machine, 1e-3 on another): far above the rounding of the full budget's, which is what shows it is read.
    assert small["cache"]["evicted_per_sequence"] == 2 * 2 * 28
    assert abs(small["cache"]["loss_delta"]) > max(1e-5, 20 * full), (small["cache"]["loss_delta"], full)


def test_recall_through_the_caches(capsys, softmax_run):
    res = _eval(capsys, softmax_run, "--recall", "--recall-pairs", "4", "--recall-samples", "4",
                "--cache-policy", "sink-window", "--cache-budget", "32")
    # A budget as long as the sequence drops nothing: recall through the caches is the forward's.
    assert res["cache"]["recall"]["results"] == res["recall"]["results"]


def test_text_output(capsys, softmax_run):
    assert main(["eval", softmax_run, "--batches", "1", "--decode", "--decode-batch", "1", "--decode-steps", "2",
                 "--decode-repeats", "1", "--cache-policy", "random", "--cache-budget", "8"]) == 0
    out = capsys.readouterr().out
    assert "cache policy random at 8 keys per layer and KV head: loss" in out and "keys evicted per sequence" in out


@pytest.mark.parametrize("flags, says", [
    (["--cache-policy", "h2o"], "--cache-policy is a setting of --decode"),
    (["--decode", "--cache-budget", "8"], "--cache-budget is a setting of --cache-policy"),
    (["--decode", "--cache-policy", "h2o"], "--cache-policy h2o: cache policy h2o needs a budget"),
    (["--decode", "--cache-policy", "h2o", "--cache-budget", "0"], "--cache-budget must be at least 1"),
    (["--decode", "--cache-policy", "spkv", "--cache-budget", "8"], "needs SP-KV layers"),
    (["--decode", "--cache-policy", "sink-window", "--cache-budget", "4"], "give a budget above 4"),
    (["--decode", "--cache-policy", "random", "--cache-budget", "8", "--cache-window", "9"],
     "cache budget 8 is smaller than the window of 9"),
])
def test_refused_requests(capsys, softmax_run, flags, says):
    assert main(["eval", softmax_run, "--batches", "1", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


def test_info_suggests_a_capacity_from_a_runs_densities(capsys, spkv_run, tmp_path):
    """The densest head's kept share of the older keys at the last eval, plus 25%, rounded up to 0.01."""
    from pathlib import Path

    from lm.tracking import read_metrics

    assert main(["info", spkv_run, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)["spkv_cache_capacity/softmax"]
    heads = [r for r in read_metrics(Path(spkv_run) / "metrics.jsonl") if "spkv_density_heads" in r][-1]
    densest = max(d for ds in heads["spkv_density_heads"].values() for d in ds)
    assert s["density"] == densest and s["capacity"] == min(np.ceil(densest * 125) / 100, 1.0)
    assert s["set"] == f"model.mixers.softmax.spkv.cache.capacity={s['capacity']}"
    assert s["kv_vs_dense"] == (8 + np.ceil(s["capacity"] * 24)) / 32
    assert main(["info", "configs/tiny/spkv.yaml", "--json"]) == 0
    assert not any(k.startswith("spkv_cache_capacity") for k in json.loads(capsys.readouterr().out))
    assert main(["info", str(tmp_path)]) == 2
    assert "no run directory (no config.yaml)" in capsys.readouterr().err
