"""A run records the data it trained on (data.json) and its resolved config says what was used; resuming,
evaluating or sampling on data that changed since is refused; the run's config finds its store from any
directory."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lm import data as lmdata
from lm.config import load_config
from lm.train import RunError, train
from lm.train.rundir import load_run, open_run_data
from tests.lm.conftest import tiny_overrides

TINY = "configs/tiny/softmax.yaml"
ROOT = Path(__file__).resolve().parents[2]


def _store_copy(small_store, tmp_path, name="store"):
    dst = tmp_path / name
    shutil.copytree(small_store, dst)
    return dst


def _docs(tmp_path):
    txt = tmp_path / "txt"
    txt.mkdir()
    for i in range(40):
        (txt / f"d{i}.txt").write_text(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" * 30)
    return txt


def test_resolved_config_names_the_store_and_its_real_tokenizer(tmp_path):
    """data.tokenizer is ignored for an existing store: the run's config.yaml must say the store's tokenizer
    (here bpe:300 although the config asks for byte), and the store's absolute path."""
    store = lmdata.prepare([str(_docs(tmp_path))], "bpe:300", tmp_path / "bpe", log=lambda *_: None)
    cfg = load_config(TINY, tiny_overrides(store, tmp_path, "bpe", **{"train.steps": 2, "model.vocab_size": 300}))
    assert cfg.data.tokenizer == "byte"
    res = train(cfg)
    saved = yaml.safe_load((res.run_dir / "config.yaml").read_text())
    assert saved["data"]["tokenizer"] == "bpe:300"
    assert saved["data"]["source"] == str(store.resolve())
    assert yaml.safe_load((res.run_dir / "data.json").read_text())["tokenizer"] == "bpe:300"


def test_store_prepared_again_with_another_tokenizer_is_refused(small_store, tmp_path):
    store = _store_copy(small_store, tmp_path)
    cfg = load_config(TINY, tiny_overrides(store, tmp_path, "r", **{"train.steps": 4}))
    res = train(cfg, max_steps_this_run=2)
    lmdata.prepare([str(_docs(tmp_path))], "bpe:300", store, overwrite=True, log=lambda *_: None)
    with pytest.raises(RunError, match=r"was trained on token store .*tokenizer byte.*now is token store .*"
                                       r"tokenizer bpe:300.*tokenizer_fingerprint"):
        cfg_, *_ = load_run(res.run_dir)
        open_run_data(res.run_dir, cfg_, log=lambda *_: None)
    with pytest.raises(RunError, match="was trained on"):
        train(load_config(TINY, tiny_overrides(store, tmp_path, "r", **{"train.steps": 4, "model.vocab_size": 300})))


def test_eval_from_another_directory_reads_the_runs_store_and_writes_nothing_there(small_store, tmp_path):
    store = _store_copy(small_store, tmp_path)
    rel = os.path.relpath(store, ROOT)
    cfg = load_config(TINY, tiny_overrides(rel, os.path.relpath(tmp_path, ROOT), "rel", **{"train.steps": 2}))
    res = train(cfg)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run([sys.executable, "-m", "lm.cli", "eval", str((ROOT / res.run_dir).resolve()), "--batches",
                          "1", "--json"], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert list(elsewhere.iterdir()) == []


def test_eval_changes_nothing_in_the_run_directory(small_store, tmp_path):
    """eval (and generate, through the same load) reads a run; a corrupt newest checkpoint is skipped with a
    warning and left where it is, and no file of the run directory is created, changed or moved."""
    from lm.eval import evaluate

    cfg = load_config(TINY, tiny_overrides(small_store, tmp_path, "ro", **{"train.steps": 4, "train.ckpt_every": 2}))
    res = train(cfg)
    for f in (res.run_dir / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")

    def snapshot():
        return {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
                for p in sorted(res.run_dir.rglob("*"))}

    before = snapshot()
    warnings = []
    out = evaluate(res.run_dir, max_batches=1, log=warnings.append)
    assert out["step"] == 2
    assert snapshot() == before
    assert not (res.run_dir / "checkpoints_corrupt").exists()


@pytest.mark.parametrize("score_padding", [True, False])
def test_training_on_document_rows(tmp_path, score_padding):
    """The paper's protocol end to end: rows are documents (about 1.5k bytes here, shorter than a row) padded
    with pad_id; with the padding masked the eval scores fewer tokens than with it scored."""
    store = lmdata.prepare([str(_docs(tmp_path))], "byte", tmp_path / "docs", val_fraction=0.3,
                           log=lambda *_: None)
    cfg = load_config(TINY, tiny_overrides(store, tmp_path, f"docs{score_padding}", **{
        "train.steps": 3, "data.rows": "documents", "data.pad_id": 10, "data.score_padding": score_padding,
        "data.seq_len": 2048}))
    res = train(cfg)
    assert res.status == "finished"
    full = 2 * 4 * 2048  # eval_steps x eval batch x seq_len
    assert (res.last_eval["eval_tokens"] == full) == score_padding
    assert res.last_eval["eval_tokens"] > 0


def test_document_rows_need_a_pad_id(tmp_path):
    from lm.config import ConfigError

    with pytest.raises(ConfigError, match="data.pad_id: data.rows=documents pads each document"):
        load_config(TINY, ["data.rows=documents"])
