import jax
import numpy as np
import pytest

from lm.data.synthetic.tasks import FIRST_TOKEN, PAD, SEP, mqar_batch, selective_copy_batch
from lm.config import load_config
from lm.data import DataError, open_dataset
from lm.tracking import read_metrics
from lm.train import train

MQAR = dict(batch_size=16, seq_len=64, n_pairs=8, vocab_size=64)


def test_mqar_structure():
    b = mqar_batch(0, 0, **MQAR)
    tok, tgt, mask = b["tokens"], b["targets"], b["loss_mask"]
    assert tok.shape == (16, 65) and tgt.shape == mask.shape == (16, 64)
    n_keys = (64 - FIRST_TOKEN) // 2
    for row, target, m in zip(tok, tgt, mask):
        keys, values = row[0:16:2], row[1:16:2]
        assert len(set(keys.tolist())) == 8 and len(set(values.tolist())) == 8
        assert (keys >= FIRST_TOKEN).all() and (keys < FIRST_TOKEN + n_keys).all()
        assert (values >= FIRST_TOKEN + n_keys).all() and (values < 64).all()
        answer_pos = np.flatnonzero(m)
        assert len(answer_pos) == 8 and (answer_pos >= 16).all() and (answer_pos % 2 == 0).all()
        table = dict(zip(keys.tolist(), values.tolist()))
        asked = [row[p] for p in answer_pos]
        assert sorted(asked) == sorted(keys.tolist())  # every key is queried once
        for p in answer_pos:  # the scored target is the value bound to the key at p
            assert target[p] == table[row[p]]
        # Each key occurs at its pair and its query only (noise never repeats a key).
        assert all(np.sum(row == k) == 2 for k in keys)
        unscored = ~m
        np.testing.assert_array_equal(target[unscored], row[1:][unscored])


def test_mqar_does_not_leak_answers_into_the_inputs():
    """The input after a query is noise, not the value: predicting "the pair's value not yet shown in the query
    span" (which scores 1.0 on the last query when values are written after their keys) is at chance."""
    b = mqar_batch(1, 0, batch_size=256, seq_len=64, n_pairs=4, vocab_size=64)
    hits = []
    rng = np.random.default_rng(0)
    for row, target, m in zip(b["tokens"], b["targets"], b["loss_mask"]):
        values = set(row[1:8:2].tolist())
        for p in np.flatnonzero(m):
            left = sorted(values - set(row[8:p + 1].tolist()))
            hits.append(bool(left) and rng.choice(left) == target[p])
    assert np.mean(hits) < 0.45  # 4 candidates and a few shown by chance: about 1/4, never the leak's ~0.52
    # The answer is the next input only by chance (noise from 62 ids).
    nxt = np.take_along_axis(b["tokens"][:, 1:], np.argwhere(b["loss_mask"])[:, 1].reshape(256, 4), axis=1)
    assert np.mean(nxt == b["targets"][b["loss_mask"]].reshape(256, 4)) < 0.05


def test_mqar_query_gaps_follow_zoology_s_power_law():
    b = mqar_batch(2, 0, batch_size=512, seq_len=64, n_pairs=1, vocab_size=64, power_a=0.01)
    slot = (np.argwhere(b["loss_mask"])[:, 1] - 2) // 2
    # p(slot i) ~ (i + 1)^(-0.99) over 31 slots: slot 0 about 1/H(31) = 0.25, slot 1 about half of that.
    assert 0.20 < np.mean(slot == 0) < 0.30 and 0.09 < np.mean(slot == 1) < 0.17
    flat = mqar_batch(2, 0, batch_size=512, seq_len=64, n_pairs=1, vocab_size=64, power_a=1.0)
    assert np.mean((np.argwhere(flat["loss_mask"])[:, 1] - 2) // 2 == 0) < 0.07  # uniform: 1/31
    with pytest.raises(ValueError, match="power_a"):
        mqar_batch(2, 0, batch_size=1, seq_len=64, n_pairs=1, vocab_size=64, power_a=0.0)
    quiet = mqar_batch(2, 0, batch_size=4, seq_len=64, n_pairs=4, vocab_size=64, noise=False)
    for row in quiet["tokens"]:  # without noise the query span is the filler id and the queried keys
        assert set(row[8:].tolist()) == {PAD} | set(row[0:8:2].tolist())


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


def test_loss_and_accuracy_score_the_batch_targets():
    """With `targets`, position t is scored against targets[:, t], not the next input token."""
    import jax.numpy as jnp

    from lm.model import init_model
    from lm.train.step import make_eval_step

    cfg = load_config("configs/tiny/softmax.yaml", ["model.vocab_size=32", "model.d_model=32", "model.n_layers=1",
                                                    "model.mlp.hidden=64", "model.mixers.softmax.n_heads=2"])
    mdef, params = init_model(cfg)
    b = mqar_batch(0, 0, batch_size=4, seq_len=32, n_pairs=4, vocab_size=32)
    step = make_eval_step(mdef)
    batch = {k: jnp.asarray(v) for k, v in b.items()}
    logits = mdef.merge(params)(batch["tokens"][:, :-1])
    pred = np.asarray(jnp.argmax(logits, -1))
    m = b["loss_mask"]
    total, count, correct, _ = step(params, batch)
    assert int(count) == 16 and int(correct) == int(((pred == b["targets"]) & m).sum())
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
    want = -np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0][m].sum()
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    # Without `targets` the same batch scores the next input tokens instead: a different loss.
    plain = {k: v for k, v in batch.items() if k != "targets"}
    other = -np.take_along_axis(logp, b["tokens"][:, 1:, None], -1)[..., 0][m].sum()
    np.testing.assert_allclose(float(step(params, plain)[0]), other, rtol=1e-5)
    assert abs(want - other) > 1e-3
