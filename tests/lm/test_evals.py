"""The evaluations beyond loss (lm/evals): each scorer against toy predictors whose right answer is known, the
measured decode-cache bytes against the analytic ones, and `attnlab eval --recall/--needle/--decode` end to end
on a tiny trained run."""
import json
from pathlib import Path

import numpy as np
import pytest

from lm.cli import main
from lm.config import load_config
from lm.evals import EvalError, Request, decode_speed, needle, recall
from lm.evals.common import TokenPool, length_mode, token_pool
from lm.data import StoreDataset, open_store
from lm.data.synthetic.dataset import SyntheticDataset
from lm.eval import evaluate
from lm.evals.common import predictor
from lm.train.rundir import load_run, open_run_data
from lm.model import init_model
from lm.train import train
from tests.lm.conftest import tiny_overrides

VOCAB = 64
POOL = TokenPool(np.arange(VOCAB, dtype=np.int32), "toy")


def copy_logits(tokens_BT: np.ndarray, *, ngram: int = 1, reach: int | None = None, vocab: int = VOCAB) -> np.ndarray:
    """One-hot logits [B,T,vocab] of a perfect copier: at t, the latest earlier place s whose last `ngram` tokens
    equal those ending at t (s at most `reach` tokens back) and the token that followed it there; token 0 where
    there is none."""
    B, T = tokens_BT.shape
    out = np.zeros((B, T, vocab), np.float32)
    t_idx, s_idx = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = (s_idx < t_idx) & (s_idx >= ngram - 1) & (t_idx >= ngram - 1)
    if reach is not None:
        allowed &= s_idx >= t_idx - reach
    for b in range(B):
        grams = np.stack([np.roll(tokens_BT[b], k) for k in range(ngram)], axis=1)  # [T, ngram]: t, t-1, ...
        match = (grams[:, None, :] == grams[None, :, :]).all(-1) & allowed
        latest = np.where(match.any(1), T - 1 - np.argmax(match[:, ::-1], axis=1), -1)
        nxt = np.where(latest >= 0, tokens_BT[b][np.minimum(latest + 1, T - 1)], 0)
        out[b, np.arange(T), nxt] = 1.0
    return out


def argmax_of(logits_fn):
    return lambda tokens: np.argmax(logits_fn(np.asarray(tokens)), axis=-1)


def random_logits(seed: int):
    rng = np.random.default_rng(seed)
    return lambda tokens: rng.normal(size=(*tokens.shape, VOCAB))


# -- recall ------------------------------------------------------------------------------------------------


def test_recall_copier_is_perfect_and_random_is_near_chance():
    res = recall.score_recall(argmax_of(copy_logits), pairs=[2, 4, 8], seq_len=48, samples=16, pool=POOL)
    assert [r["n_pairs"] for r in res["results"]] == [2, 4, 8]
    assert all(r["accuracy"] == 1.0 for r in res["results"])
    assert [r["queries"] for r in res["results"]] == [32, 64, 128]
    n_values = (VOCAB - 2) // 2
    assert res["chance"] == pytest.approx(1 / n_values)
    # A model that knows a value comes but not which: uniform over the value ids.
    rng = np.random.default_rng(0)
    guess = lambda tokens: rng.integers(2 + n_values, 2 + 2 * n_values, tokens.shape)
    res = recall.score_recall(guess, pairs=[8], seq_len=48, samples=128, pool=POOL)
    assert res["results"][0]["accuracy"] == pytest.approx(res["chance"], abs=0.02)
    res = recall.score_recall(argmax_of(random_logits(1)), pairs=[8], seq_len=48, samples=64, pool=POOL)
    assert res["results"][0]["accuracy"] < 0.05


def test_recall_sequences_are_the_generator_s_in_pool_ids_and_fixed():
    pool = TokenPool(np.arange(100, 140, dtype=np.int32)[::-1].copy(), "shifted")
    tokens, targets, mask = recall.recall_sequences(4, seq_len=32, samples=3, pool=pool)
    again, _, _ = recall.recall_sequences(4, seq_len=32, samples=3, pool=pool)
    assert tokens.shape == (3, 33) and targets.shape == mask.shape == (3, 32) and mask.sum() == 12
    assert np.array_equal(tokens, again) and set(np.unique(tokens)) <= set(pool.ids)
    plain, plain_targets, plain_mask = recall.recall_sequences(4, seq_len=32, samples=3,
                                                               pool=TokenPool(np.arange(40), "identity"))
    assert np.array_equal(tokens, pool.ids[plain]) and np.array_equal(mask, plain_mask)
    assert np.array_equal(targets, pool.ids[plain_targets])
    copier = argmax_of(lambda t: copy_logits(t, vocab=140))
    assert recall.score_recall(copier, pairs=[4], seq_len=32, samples=3, pool=pool)["results"][0]["accuracy"] == 1.0


def test_recall_pairs_that_do_not_fit_are_refused():
    assert recall.resolve_pairs(None, seq_len=32, pool=POOL) == [4, 8]
    with pytest.raises(EvalError, match="--recall-pairs 9 does not fit.*seq_len >= 36"):
        recall.resolve_pairs([9], seq_len=32, pool=POOL)
    with pytest.raises(EvalError, match="--recall-pairs 40 does not fit.*token ids"):
        recall.resolve_pairs([40], seq_len=1024, pool=POOL)
    with pytest.raises(EvalError, match="no default --recall-pairs"):
        recall.resolve_pairs(None, seq_len=12, pool=POOL)


# -- needle ------------------------------------------------------------------------------------------------


def _needle(predict_for, lengths, depths=(0.1, 0.5, 0.9), seq_len=64, samples=4):
    return needle.score_needle(predict_for, lengths=lengths, depths=list(depths), samples=samples, pool=POOL,
                               filler="random", seq_len=seq_len)


def test_needle_copier_finds_every_needle_and_random_none():
    copier = argmax_of(lambda t: copy_logits(t, ngram=needle.KEY_TOKENS))
    res = _needle(lambda L: copier, [(32, "fits"), (64, "fits"), (128, "extrapolate")])
    assert [(r["length"], r["mode"]) for r in res["results"]] == [(32, "fits"), (64, "fits"), (128, "extrapolate")]
    for r in res["results"]:
        assert r["accuracy"] == 1.0 and [d["depth"] for d in r["by_depth"]] == [0.1, 0.5, 0.9]
        assert all(d["accuracy"] == d["token_accuracy"] == 1.0 for d in r["by_depth"])
    res = _needle(lambda L: argmax_of(random_logits(2)), [(64, "fits")], samples=16)
    assert res["results"][0]["accuracy"] == 0.0 and res["results"][0]["by_depth"][0]["token_accuracy"] < 0.1
    assert res["chance"] == pytest.approx((VOCAB - 2) ** -needle.VALUE_TOKENS)


def test_needle_depth_is_where_the_needle_sits():
    """A copier that sees only the last half of the sequence finds the needles planted there and no other."""
    half = argmax_of(lambda t: copy_logits(t, ngram=needle.KEY_TOKENS, reach=t.shape[1] // 2))
    res = _needle(lambda L: half, [(128, "fits")], depths=(0.0, 0.1, 0.9, 1.0))
    assert [d["accuracy"] for d in res["results"][0]["by_depth"]] == [0.0, 0.0, 1.0, 1.0]
    rng = np.random.default_rng(0)
    tokens, values, at = needle.needle_sequences(rng, length=100, depth=0.5, samples=2, pool=POOL,
                                                 fill=lambda r, n, m: np.zeros((n, m), np.int32))
    assert tokens.shape == (2, 100) and at == 42  # (100 - 16) / 2
    assert np.array_equal(tokens[:, at + 4:at + 8], values) and np.array_equal(tokens[:, -4:], values)


def test_needle_slide_scores_the_last_window_only():
    copier = argmax_of(lambda t: copy_logits(t, ngram=needle.KEY_TOKENS))
    seen = []
    res = _needle(lambda L: seen.append(L) or copier, [(256, "slide")], seq_len=64)
    assert seen == [64]  # the predictor of the window, not of the whole sequence
    assert [d["accuracy"] for d in res["results"][0]["by_depth"]] == [0.0, 0.0, 1.0]


def test_needle_lengths_past_seq_len(tmp_path):
    rope = load_config("configs/tiny/softmax.yaml", tiny_overrides("stdlib", tmp_path))
    assert needle.resolve_lengths(rope, None, slide=False) == [(32, "fits"), (64, "extrapolate")]
    assert needle.resolve_lengths(rope, [48], slide=True) == [(48, "slide")]
    learned = load_config("configs/tiny/softmax.yaml", tiny_overrides("stdlib", tmp_path, **{
        "model.pos": "learned", "model.max_seq_len": 32}))
    assert needle.resolve_lengths(learned, None, slide=False) == [(32, "fits")]
    with pytest.raises(EvalError, match=r"--needle-lengths 64 is longer than the model's learned position table.*"
                                        r"--slide"):
        needle.resolve_lengths(learned, [32, 64], slide=False)
    assert length_mode(learned, 64, slide=True, what="x") == "slide"
    with pytest.raises(EvalError, match="too short"):
        needle.resolve_lengths(rope, [16], slide=False)


def test_requests_wrong_whatever_the_run():
    Request(recall=True, recall_pairs=[4]).check()
    for req, says in ((Request(recall_pairs=[4]), "--recall-pairs is a setting of --recall"),
                      (Request(slide=True), "--slide is a setting of --needle"),
                      (Request(decode_steps=4), "--decode-steps is a setting of --decode"),
                      (Request(needle=True, needle_depths=[1.5]), r"--needle-depths must be fractions in \[0, 1\]"),
                      (Request(decode=True, decode_batch=0), "--decode-batch must be at least 1")):
        with pytest.raises(EvalError, match=says):
            req.check()


def test_token_pool_of_a_store(small_store):
    cfg = load_config("configs/tiny/softmax.yaml", tiny_overrides(small_store, "runs"))
    pool = token_pool(cfg, StoreDataset(open_store(small_store)))
    counts = np.bincount(np.asarray(open_store(small_store).split("val")), minlength=256)
    assert len(set(pool.ids.tolist())) == len(pool.ids) > 50 and pool.ids.max() < cfg.model.vocab_size
    assert list(counts[pool.ids]) == sorted(counts[pool.ids], reverse=True)
    assert pool.ids[0] == np.argmax(counts) and pool.text is not None
    mqar = token_pool(cfg, SyntheticDataset("mqar", {"n_pairs": 4, "vocab_size": 64}, seed=0))
    assert np.array_equal(mqar.ids, np.arange(64)) and mqar.text is None  # the task's ids, as trained


# -- decode caches -----------------------------------------------------------------------------------------


def _measure(config, tmp_path, **extra):
    cfg = load_config(config, tiny_overrides("stdlib", tmp_path, **extra))
    mdef, params = init_model(cfg)
    prompt = np.random.default_rng(0).integers(0, 256, (2, 12)).astype(np.int32)
    return decode_speed.measure_decode(mdef, params, prompt, steps=4, repeats=1)


def test_measured_cache_bytes_equal_the_analytic_ones(tmp_path):
    sm = _measure("configs/tiny/softmax.yaml", tmp_path)
    # 2 layers x K and V x 2 heads x head_dim 16 x fp32
    assert sm["bytes_per_token"] == sm["analytic_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert sm["state_bytes"] == sm["analytic_state_bytes"] == 0 and sm["matches_analytic"]
    assert sm["cache_bytes"] == 2 * 16 * sm["bytes_per_token"] == sm["batch"] * sm["analytic_bytes_per_sequence"]
    assert sm["tokens_per_s"] > 0 and sm["ms_per_step"] > 0 and sm["cache_tokens"] == 16
    kv = _measure("configs/tiny/share_kv.yaml", tmp_path)
    assert kv["matches_analytic"] and kv["bytes_per_token"] == sm["bytes_per_token"] // 2  # only K is cached
    assert [list(layer["arrays"]) for layer in kv["layers"]] == [["k"], ["k"]]
    kda = _measure("configs/tiny/kda.yaml", tmp_path, **{"model.mixers.kda.n_heads": 2})
    # per layer: fp32 state 2 x 16 x 16 and three conv windows of 3 x 32
    assert kda["bytes_per_token"] == kda["analytic_bytes_per_token"] == 0
    assert kda["state_bytes"] == kda["analytic_state_bytes"] == 2 * (2 * 16 * 16 * 4 + 3 * 3 * 32 * 4)
    assert kda["cache_bytes"] == 2 * kda["state_bytes"] and kda["matches_analytic"]


def test_spkv_cache_reports_what_it_holds(tmp_path):
    # Every gate closed (init_bias -20): the pruned cache holds the last `window` tokens of each KV head.
    res = _measure("configs/tiny/spkv.yaml", tmp_path, **{
        "model.mixers.softmax.spkv.window": 8, "model.mixers.softmax.spkv.init_bias": -20,
        "model.mixers.softmax.spkv.anneal.freeze_steps": 2, "model.mixers.softmax.spkv.anneal.ramp_steps": 2})
    kv_token = 2 * 2 * 2 * 16 * 4
    # No capacity set: allocated for the worst case, plus an int32 position and an fp32 score per slot and KV
    # head (2 layers x 2 heads). Fixed, per layer and sequence: admission bits of the 8 window slots, stored and
    # evicted counts, and the store's pool bookkeeping: a store under 64 keys is one page per (sequence, KV head)
    # pair, so one page-table entry and one page owner per pair, and the batch's count of pages handed out (an
    # int32 for the batch of 2: 2 bytes per sequence).
    assert res["analytic_bytes_per_token"] == kv_token and res["bytes_per_token"] == kv_token + 2 * 2 * 8
    assert res["state_bytes"] == 2 * (8 * 2 + 2 * 4 + 2 * 4 + 2 * 4 + 2 * 4 + 4 // 2) and not res["matches_analytic"]
    s = res["pruned"]
    assert s["dense_kv_bytes_per_sequence"] == 16 * kv_token
    assert s["held_kv_bytes_per_sequence"] == 8 * kv_token and s["compression"] == 2.0
    assert s["allocated_bytes_per_sequence"] == 16 * res["bytes_per_token"] + res["state_bytes"]
    assert s["evicted_per_sequence"] == 0
    assert all(layer["entries_per_head"] == [8.0, 8.0] for layer in s["layers"].values())


# -- attnlab eval, end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(small_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    res = train(load_config("configs/tiny/softmax.yaml", tiny_overrides(small_store, out, "ev", **{
        "train.steps": 3, "train.eval_steps": 1})))
    assert res.status == "finished"
    return str(res.run_dir)


def _eval_json(capsys, run, *flags):
    assert main(["eval", run, "--json", "--batches", "1", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_predictor_is_the_argmax_the_loss_eval_scores(run):
    """The recall and needle scores read the same argmax as `eval_acc`: equal on the first held-out batch."""
    acc = evaluate(run, max_batches=1, log=lambda _: None)["eval_acc"]
    cfg, setup, params, _ = load_run(run)
    tokens = open_run_data(Path(run), cfg, lambda _: None).eval_batches(seq_len=32, batch_size=4,
                                                                      max_batches=1)[0]["tokens"]
    pred = predictor(setup.mdef, params, rows=3)(tokens[:, :-1])  # 3 rows per call: a padded last chunk
    assert pred.shape == (4, 32) and np.mean(pred == tokens[:, 1:]) == pytest.approx(acc, abs=1e-9)


def test_cli_recall(run, capsys):
    res = _eval_json(capsys, run, "--recall", "--recall-samples", "8")
    assert res["step"] == 3 and res["eval_loss"] > 0 and "needle" not in res and "decode" not in res
    r = res["recall"]
    assert r["seq_len"] == 32 and r["samples"] == 8 and 0 < r["chance"] < 0.1 and "held-out" in r["pool"]
    assert [x["n_pairs"] for x in r["results"]] == [4, 8]
    assert all(0.0 <= x["accuracy"] <= 1.0 and x["queries"] == 8 * x["n_pairs"] for x in r["results"])


def test_cli_needle(run, capsys):
    res = _eval_json(capsys, run, "--needle", "--needle-samples", "2", "--needle-depths", "0.25", "0.75")
    n = res["needle"]
    assert n["filler"] == "text" and n["samples"] == 2 and n["key_tokens"] == n["value_tokens"] == 4
    assert [(x["length"], x["mode"]) for x in n["results"]] == [(32, "fits"), (64, "extrapolate")]
    for x in n["results"]:
        assert [d["depth"] for d in x["by_depth"]] == [0.25, 0.75]
        assert all(0.0 <= d["accuracy"] <= d["token_accuracy"] <= 1.0 for d in x["by_depth"])
    res = _eval_json(capsys, run, "--needle", "--needle-samples", "2", "--needle-lengths", "64", "--slide",
                     "--needle-filler", "random")
    assert [(x["length"], x["mode"]) for x in res["needle"]["results"]] == [(64, "slide")]


def test_cli_decode(run, capsys):
    res = _eval_json(capsys, run, "--decode", "--decode-batch", "2", "--decode-steps", "4", "--decode-repeats", "2")
    d = res["decode"]
    assert (d["batch"], d["prompt"], d["steps"], d["cache_tokens"]) == (2, 28, 4, 32)
    assert d["tokens_per_s"] > 0 and d["matches_analytic"] and d["bytes_per_token"] == 512
    assert d["cache_bytes"] == 2 * 32 * 512 and len(d["layers"]) == 2


def test_cli_text_lines(run, capsys):
    assert main(["eval", run, "--batches", "1", "--recall", "--recall-pairs", "4", "--recall-samples", "4",
                 "--needle", "--needle-lengths", "32", "--needle-samples", "1", "--decode", "--decode-steps", "2",
                 "--decode-repeats", "1", "--decode-batch", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{run} step 3: loss ")  # the loss lines come first, as without the flags
    assert out[2].startswith("recall (MQAR, 32 tokens, 4 sequences each, chance ") and "4 pairs " in out[2]
    assert any(line.startswith("needle (4-token key -> 4-token value, text filler") for line in out)
    assert any(line.strip().startswith("32 tokens: 10% ") for line in out)
    assert any(line.startswith("decode (batch 1, prompt 30 + 2 steps") and "tokens/s" in line for line in out)
    assert any("(equal)" in line for line in out)


@pytest.mark.parametrize("flags, says", [
    (["--recall", "--recall-pairs", "9"], "--recall-pairs 9 does not fit the run (data.seq_len=32"),
    (["--recall-pairs", "4"], "--recall-pairs is a setting of --recall; add --recall"),
    (["--needle", "--needle-lengths", "8"], "--needle-lengths 8 is too short"),
    (["--needle", "--needle-depths", "2"], "--needle-depths must be fractions"),
    (["--decode", "--decode-steps", "0"], "--decode-steps must be at least 1"),
])
def test_cli_bad_requests_are_one_line_errors(run, capsys, flags, says):
    assert main(["eval", run, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and says in err[-1] and "Traceback" not in "".join(err)


def test_cli_unknown_run_dir(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope"), "--recall", "--needle", "--decode"]) == 2
    assert "is not a run directory" in capsys.readouterr().err
