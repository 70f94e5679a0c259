import json

import pytest

from lm.cli import main
from lm.config import load_config
from lm.train import train
from tests.lm.conftest import tiny_overrides

TINY = "configs/tiny/softmax.yaml"


@pytest.fixture(scope="module")
def trained_run(small_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    res = train(load_config(TINY, tiny_overrides(small_store, out, "cli", **{"train.steps": 20})))
    assert res.status == "finished"
    return res


def _sets(overrides):
    return sum((["--set", o] for o in overrides), [])


def test_eval_json(trained_run, capsys):
    assert main(["eval", str(trained_run.run_dir), "--json", "--batches", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["step"] == 20
    assert res["eval_loss"] == pytest.approx(trained_run.last_eval["eval_loss"], rel=0.2)
    assert res["eval_bpb"] > 0 and res["eval_ppl"] > 1


def test_generate_greedy_is_deterministic(trained_run, capsys):
    args = ["generate", str(trained_run.run_dir), "--prompt", "def ", "--max-new-tokens", "16"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("def ")
    assert main(args + ["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9"]) == 0


def test_info_json():
    from lm.cli import main as cli

    import io
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli(["info", TINY, "--json"]) == 0
    info = json.loads(buf.getvalue())
    cfg = load_config(TINY)
    d, L = cfg.model.d_model, cfg.model.n_layers
    assert info["params"] == 1_869_504
    # K and V, fp32, every layer: 2 * d_model * 4 bytes * layers.
    assert info["kv_cache_bytes_per_token"] == 2 * d * 4 * L
    assert info["flops_per_token"] > 2 * (info["params"] - 256 * d)


def test_data_prepare(tmp_path, capsys):
    src = tmp_path / "docs"
    src.mkdir()
    for i in range(40):
        (src / f"d{i}.txt").write_text(f"document {i}: " + "some text to model. " * 60)
    out = tmp_path / "store"
    assert main(["data", "prepare", "--source", str(src), "--tokenizer", "byte", "--out", str(out)]) == 0
    assert "train" in capsys.readouterr().out
    assert (out / "meta.json").exists()


def test_bad_data_errors_are_one_line(tmp_path, capsys):
    code = main(["train", TINY, *_sets(tiny_overrides(tmp_path / "missing", tmp_path))])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "does not exist" in err and "Traceback" not in err


def test_vocab_too_small_is_refused(small_store, tmp_path, capsys):
    code = main(["train", TINY, *_sets(tiny_overrides(small_store, tmp_path, **{"model.vocab_size": 100}))])
    err = capsys.readouterr().err
    assert code == 2 and "vocab" in err


def test_eval_of_a_non_run_dir(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_bench_step_json(capsys):
    small = ["model.d_model=32", "model.n_layers=1", "model.mlp.hidden=64", "data.seq_len=16", "data.batch_size=2"]
    assert main(["bench", "step", "configs/bench/cpu_d512_l8.yaml", "--json", "--steps", "2", *_sets(small)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("tokens_per_s", "mfu", "matmul_peak_gflops", "step_s_median", "jax", "date"):
        assert key in res
    assert res["tokens_per_step"] == 32 and 0 < res["mfu"] < 1.5
