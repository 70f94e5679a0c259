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


def test_generate_samples_by_default_reproducibly_per_seed(trained_run, capsys):
    run = str(trained_run.run_dir)
    args = ["generate", run, "--prompt", "def ", "--max-new-tokens", "16"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("def ")
    assert main(args) == 0
    assert capsys.readouterr().out == first  # --seed 0 by default
    assert main(args + ["--temperature", "0.8", "--top-k", "40", "--seed", "0"]) == 0
    assert capsys.readouterr().out == first  # the defaults, spelled out
    assert main(args + ["--seed", "1"]) == 0
    assert capsys.readouterr().out != first
    assert main(args + ["--greedy"]) == 0
    greedy = capsys.readouterr().out
    assert greedy != first
    assert main(args + ["--greedy", "--seed", "5"]) == 0
    assert capsys.readouterr().out == greedy
    assert main(args + ["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9"]) == 0


@pytest.mark.parametrize("flags, says", [
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--top-k", "-2"], "--top-k must be at least 1"),
    (["--temperature", "0"], "--temperature must be greater than 0"),
    (["--temperature", "-0.5"], "--temperature must be greater than 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--greedy", "--top-k", "5"], "--greedy"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--prompt", ""], "--prompt encodes to no tokens"),
])
def test_generate_refuses_bad_arguments_in_one_line(trained_run, capsys, flags, says):
    code = main(["generate", str(trained_run.run_dir), "--prompt", "def ", *flags])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("error:") and says in err and err.count("\n") == 1, err


def test_generate_past_the_trained_context(trained_run, capsys):
    """The fixture's run was trained on 32-token windows (RoPE): 4 + 40 tokens are refused by default, and
    --slide generates them in a sliding window, saying so on stderr."""
    args = ["generate", str(trained_run.run_dir), "--prompt", "def ", "--max-new-tokens", "40"]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    for part in ("error:", "4 tokens", "--max-new-tokens 40", "44 tokens", "data.seq_len=32", "at most 28",
                 "--slide", "--extrapolate"):
        assert part in err, (part, err)
    assert main(args + ["--slide"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def ") and "32-token window" in err
    assert main(args + ["--extrapolate"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def ") and "extrapolat" in err


def test_stdout_carries_only_the_result(trained_run, capsys, monkeypatch):
    """What the data layer says while opening the run's data (e.g. "reusing token store ...", printed for the
    default corpus) goes to stderr: `eval --json` prints JSON alone, `generate` the text alone."""
    import lm.data

    real = lm.data.open_dataset

    def chatty(*args, log=print, **kw):
        log("reusing token store data/x (same source and tokenizer)")
        return real(*args, log=log, **kw)

    monkeypatch.setattr(lm.data, "open_dataset", chatty)
    run = str(trained_run.run_dir)
    assert main(["eval", run, "--json", "--batches", "2"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["batches"] == 2 and "reusing token store" in err
    assert main(["generate", run, "--prompt", "def ", "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def ") and "reusing token store" not in out and "reusing token store" in err


def test_eval_as_in_training_reproduces_the_logged_eval(trained_run, capsys):
    from lm.tracking import read_metrics

    logged = [r for r in read_metrics(trained_run.run_dir / "metrics.jsonl") if "eval_loss" in r][-1]
    run = str(trained_run.run_dir)
    assert main(["eval", run, "--json", "--as-in-training"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["eval_loss"] == pytest.approx(logged["eval_loss"], rel=1e-6, abs=0)
    assert res["batches"] == 2 and res["eval_tokens"] == logged["eval_tokens"] == 2 * 4 * 32  # train.eval_steps
    assert main(["eval", run, "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert whole["batches"] > 2 and whole["eval_tokens"] == whole["batches"] * 4 * 32
    assert "whole held-out split" in whole["scored"]
    assert main(["eval", run, "--as-in-training", "--batches", "3"]) == 2
    assert "--as-in-training" in capsys.readouterr().err


def test_eval_text_says_what_it_scored(trained_run, capsys):
    run = str(trained_run.run_dir)
    assert main(["eval", run]) == 0
    out = capsys.readouterr().out
    assert "tokens in" in out and "batches" in out and "whole held-out split" in out
    assert "--as-in-training" in out  # how to get training's number instead
    assert main(["eval", run, "--as-in-training"]) == 0
    out = capsys.readouterr().out
    assert "256 tokens in 2 batches" in out and "train.eval_steps=2" in out


def _parsers(parser, name="attnlab"):
    """(command name, parser) of the parser and every subcommand below it."""
    import argparse

    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_argument_has_help():
    import argparse

    from lm.cli import build_parser

    missing = []
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{name} {c.dest}" for c in action._choices_actions if not c.help]
            elif not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_the_demos_suggested_command_runs(trained_run, capsys):
    import shlex

    from lm.demo import suggested_command

    cmd = suggested_command(trained_run.run_dir, load_config(trained_run.run_dir / "config.yaml"))
    argv = shlex.split(cmd)
    assert argv[0] == "attnlab" and "--greedy" not in argv
    assert main(argv[1:]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def ") and len(set(out[4:].strip())) > 3, out  # sampled text, not one repeated byte


def test_readme_lists_every_subcommand():
    from pathlib import Path

    from lm.cli import build_parser

    readme = Path(__file__).resolve().parents[2].joinpath("README.md").read_text()
    usage = readme[readme.index("## Using it"):readme.index("Experiments (")]
    for name, _ in _parsers(build_parser()):
        if name.count(" ") == 1 or name in ("attnlab data prepare", "attnlab bench step", "attnlab bench ops",
                                                 "attnlab bench decode", "attnlab kernels lower"):
            assert f"\n{name} " in usage, name


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
    wider = tmp_path / "wider"
    assert main(["data", "prepare", "--source", str(src), "--tokenizer", "byte", "--out", str(wider),
                 "--val-fraction", "0.25"]) == 0
    from lm.data import open_store

    assert open_store(wider).meta["split"]["val_fraction"] == 0.25
    assert open_store(wider).n_tokens("val") > 5 * open_store(out).n_tokens("val")


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


def test_bench_decode_json(tmp_path):
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--S", "40", "--B", "1", "--Hq", "4", "--Hkv", "2", "--D", "16", "--dtype",
                 "float32", "--impl", "xla", "pallas", "--reps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["op"], r["kv"]) for r in rows] == [(f"softmax_decode[{i}]", kv) for i in ("xla", "pallas")
                                                  for kv in ("K,V", "K=V", "K=V+rope")]
    assert all(r["step_ms"] > 0 and r["GBps"] > 0 for r in rows)
    # K=V reads one cache array instead of two.
    assert rows[1]["cache_bytes"] * 2 == rows[0]["cache_bytes"] == 40 * 2 * 16 * 4 * 2


@pytest.mark.parametrize("args, says", [
    (["--dtype", "fp8"], "--dtype fp8: the decode benchmark runs float32 or bfloat16"),
    (["--impl", "xla", "foo"], "--impl foo: softmax_decode has no such implementation (it has pallas, reference, xla)"),
    (["--S", "0"], "--S must be at least 1, got [0]"),
    (["--Hq", "6", "--Hkv", "4"], "--Hq 6 is not a multiple of --Hkv 4"),
])
def test_bench_decode_refuses_what_it_cannot_run(capsys, args, says):
    assert main(["bench", "decode", "--S", "40", "--B", "1", "--Hq", "4", "--Hkv", "2", "--D", "16", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {says}"), err
