import numpy as np
import pytest

from lm.data.synthetic.tasks import FIRST_TOKEN, SEP, mqar_batch, selective_copy_batch
from lm.config import load_config
from lm.data import DataError, open_dataset
from lm.tracking import read_metrics
from lm.train import train

MQAR = dict(batch_size=16, seq_len=64, n_pairs=8, vocab_size=64)


def test_mqar_structure():
    b = mqar_batch(0, 0, **MQAR)
    tok, mask = b["tokens"], b["loss_mask"]
    assert tok.shape == (16, 65) and mask.shape == (16, 64)
    n_keys = (64 - FIRST_TOKEN) // 2
    for row, m in zip(tok, mask):
        keys, values = row[0:16:2], row[1:16:2]
        assert len(set(keys.tolist())) == 8
        assert (keys >= FIRST_TOKEN).all() and (keys < FIRST_TOKEN + n_keys).all()
        assert (values >= FIRST_TOKEN + n_keys).all() and (values < 64).all()
        answer_pos = np.flatnonzero(m)
        assert len(answer_pos) == 8 and (answer_pos >= 16).all()
        table = dict(zip(keys.tolist(), values.tolist()))
        asked = [row[p] for p in answer_pos]
        assert sorted(asked) == sorted(keys.tolist())  # every key is queried once
        for p in answer_pos:  # the scored target (tokens[p + 1]) is the value bound to the key at p
            assert row[p + 1] == table[row[p]]


def test_mqar_is_deterministic_and_varies():
    a, b = mqar_batch(3, 5, **MQAR), mqar_batch(3, 5, **MQAR)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(a["tokens"], mqar_batch(3, 6, **MQAR)["tokens"])
    assert not np.array_equal(a["tokens"], mqar_batch(4, 5, **MQAR)["tokens"])


def test_selective_copy_structure():
    b = selective_copy_batch(0, 0, batch_size=4, seq_len=40, n_tokens=6, vocab_size=20)
    for row, m in zip(b["tokens"], b["loss_mask"]):
        sep = int(np.flatnonzero(row == SEP)[0])
        data = row[:sep][row[:sep] >= FIRST_TOKEN]
        assert len(data) == 6
        np.testing.assert_array_equal(row[sep + 1:sep + 7], data)
        np.testing.assert_array_equal(np.flatnonzero(m), np.arange(sep, sep + 6))


def test_dataset_resumes_and_validates():
    ds = open_dataset("synthetic:mqar", tokenizer="byte", data_dir="data", task={"n_pairs": 4, "vocab_size": 32})
    it = ds.train_iterator(seq_len=32, batch_size=4, seed=1)
    [next(it) for _ in range(3)]
    state = it.get_state()
    want = [next(it)["tokens"] for _ in range(2)]
    it2 = ds.train_iterator(seq_len=32, batch_size=4, seed=1)
    it2.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(it2)["tokens"], w)
    shard = ds.train_iterator(seq_len=32, batch_size=4, seed=1, process_index=1, process_count=2)
    np.testing.assert_array_equal(next(shard)["tokens"], mqar_batch(1, 0, batch_size=4, seq_len=32, n_pairs=4,
                                                                    vocab_size=32)["tokens"][2:])
    with pytest.raises(DataError, match="unknown setting"):
        open_dataset("synthetic:mqar", tokenizer="byte", data_dir="data", task={"n_pair": 4, "vocab_size": 32})
    with pytest.raises(DataError, match="needs"):
        open_dataset("synthetic:mqar", tokenizer="byte", data_dir="data", task={"vocab_size": 32})
    with pytest.raises(DataError, match="no such synthetic task"):
        open_dataset("synthetic:nope", tokenizer="byte", data_dir="data")
    with pytest.raises(DataError, match="seq_len"):
        ds.train_iterator(seq_len=8, batch_size=4, seed=1)


def test_training_on_mqar_scores_only_answers(tmp_path):
    over = ["run.out_dir=" + str(tmp_path), "run.name=mqar", "data.source=synthetic:mqar",
            "data.task={n_pairs: 4, vocab_size: 32}", "model.vocab_size=32", "data.seq_len=32", "data.batch_size=8",
            "model.d_model=32", "model.n_layers=2", "model.mlp.hidden=64", "model.mixers.softmax.n_heads=2",
            "train.steps=6", "train.log_every=2", "train.eval_steps=2", "optim.warmup_steps=1", "wandb.mode=disabled"]
    res = train(load_config("configs/tiny/softmax.yaml", over))
    assert res.status == "finished"
    ev = [r for r in read_metrics(res.run_dir / "metrics.jsonl") if "eval_loss" in r][-1]
    assert ev["eval_tokens"] == 2 * 8 * 4  # eval batches x batch x queries: only answers are scored
    assert "eval_bpb" not in ev and 0 <= ev["eval_acc"] <= 1
