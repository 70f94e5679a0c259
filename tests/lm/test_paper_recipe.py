"""The projection-sharing paper's training recipe as config choices: an fp32 residual stream under bf16 compute
(model.residual_dtype), rejected steps retried without advancing (train.retry_rejected), and rows whose last
input position is not scored (data.score_last)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.config import load_config
from lm.model import init_model

SMALL = ["model.d_model=64", "model.n_layers=2", "model.mlp.hidden=128", "data.seq_len=32"]
GPT2 = ["model.norm=layernorm", "model.bias=true", "model.pos=learned", "model.mlp.kind=gelu",
        "model.tie_embeddings=true", "model.max_seq_len=64", "model.mixers.softmax.n_heads=4"]


def _logits(config: str, extra: list[str], params=None, base=SMALL):
    cfg = load_config(config, base + extra)
    mdef, fresh = init_model(cfg)
    params = fresh if params is None else params
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32)), jnp.int32)
    return jax.jit(lambda p, t: mdef.merge(p)(t))(params, toks), params


def _err(a, b) -> float:
    return float(jnp.sqrt(jnp.mean((a - b) ** 2)) / jnp.sqrt(jnp.mean(b ** 2)))


def test_fp32_residual_under_bf16_is_closer_to_fp32():
    """Same weights: bf16 compute with the fp32 residual stream is nearer the all-fp32 logits than bf16 compute
    with a bf16 stream; with fp32 compute the option changes nothing."""
    deep = GPT2 + ["model.n_layers=8"]  # rounding the stream after every block adds up over the layers
    ref, params = _logits("configs/tiny/softmax.yaml", deep)
    bf16, _ = _logits("configs/tiny/softmax.yaml", deep + ["model.dtype=bfloat16"], params)
    mixed, _ = _logits("configs/tiny/softmax.yaml", deep + ["model.dtype=bfloat16", "model.residual_dtype=float32"],
                       params)
    same, _ = _logits("configs/tiny/softmax.yaml", deep + ["model.residual_dtype=float32"], params)
    assert bool(jnp.all(same == ref))
    assert mixed.dtype == jnp.float32 and _err(mixed, ref) < 0.7 * _err(bf16, ref), (_err(mixed, ref), _err(bf16, ref))


def test_fp32_residual_keeps_projections_in_bf16():
    """Every matmul of the forward pass still takes bf16 operands: the stream is fp32, the compute is not."""
    cfg = load_config("configs/tiny/softmax.yaml", SMALL + GPT2 + ["model.dtype=bfloat16",
                                                                     "model.residual_dtype=float32"])
    mdef, params = init_model(cfg)
    toks = jnp.zeros((1, 8), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p, t: mdef.merge(p)(t))(params, toks)
    dots = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars), \
        {str(v.aval.dtype) for e in dots for v in e.invars}


def _eqns(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs inside it (jit, scan, remat, custom_vjp bodies)."""
    for e in jaxpr.eqns:
        yield e
        for value in e.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


@pytest.mark.parametrize("config", ["softmax", "spkv", "cca", "kda", "lightning", "kimi_hybrid", "minimax_hybrid"])
def test_every_mixer_runs_on_an_fp32_stream_under_bf16(config):
    out, _ = _logits(f"configs/tiny/{config}.yaml", ["model.dtype=bfloat16", "model.residual_dtype=float32"],
                     base=[])
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))


def test_a_rejected_step_is_retried_without_advancing(small_store, tmp_path):
    """train.retry_rejected: a rejected step leaves `step` where it was (the next batch tries it again); an
    accepted one advances it. Without it a rejected step still uses up a step."""
    from lm.train.setup import build
    from lm.train.step import make_train_step
    from tests.lm.conftest import tiny_overrides

    batch = {"tokens": jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 33)), jnp.int32)}
    for retry, after_reject in ((True, 0), (False, 1)):
        cfg = load_config("configs/tiny/softmax.yaml", tiny_overrides(small_store, tmp_path, **{
            "train.retry_rejected": str(retry).lower()}))
        setup = build(cfg)
        step = jax.jit(make_train_step(cfg, setup.mdef, setup.tx, setup.schedule))
        state = jax.jit(setup.fresh_state)()
        bad = jax.tree.map(lambda x: x, state)
        bad["params"]["final_norm"]["scale"] = bad["params"]["final_norm"]["scale"].at[0].set(jnp.nan)
        rejected, m = step(bad, batch)
        assert not bool(m["ok"]) and int(rejected["step"]) == after_reject and int(rejected["rejected"]) == 1
        accepted, m = step({**rejected, "params": state["params"]}, batch)
        assert bool(m["ok"]) and int(accepted["step"]) == after_reject + 1


def test_a_run_that_retries_makes_every_step_it_was_given(small_store, tmp_path):
    """With a grad-norm ceiling that rejects some steps, a retrying run still ends at train.steps accepted steps,
    its learning rate at the end where the schedule ends; a counting run ends at train.steps attempts, fewer of
    them accepted."""
    from lm.tracking import read_metrics
    from lm.train import train
    from tests.lm.conftest import tiny_overrides

    def run(name, **extra):
        cfg = load_config("configs/tiny/softmax.yaml", tiny_overrides(small_store, tmp_path, name, **{
            "train.steps": 16, "train.max_rejected": 50, **extra}))
        res = train(cfg)
        rows = [r for r in read_metrics(res.run_dir / "metrics.jsonl") if "loss" in r]
        return res, rows

    _, free = run("free")
    ceiling = float(np.median([r["grad_norm"] for r in free]))
    res, rows = run("retry", **{"train.skip_grad_norm": ceiling, "train.retry_rejected": "true"})
    assert res.status == "finished" and res.step == 16 and rows[-1]["step"] == 16
    assert rows[-1]["rejected_steps"] > 0 and [r["step"] for r in rows] == list(range(1, 17))
    assert rows[-1]["lr"] == pytest.approx(free[-1]["lr"])  # the schedule followed the accepted steps
    res, rows = run("count", **{"train.skip_grad_norm": ceiling})
    assert res.status == "finished" and rows[-1]["step"] == 16 and rows[-1]["rejected_steps"] > 0
    assert rows[-1]["lr"] > free[-1]["lr"]  # fewer accepted steps: the schedule ends short of its last value


@pytest.mark.parametrize("score_padding", [True, False])
def test_document_rows_without_the_last_target(small_store, score_padding):
    """data.score_last false: a row holds a document's first seq_len tokens (the model reads tokens[:seq_len]),
    the target after them is never scored, and with score_padding off the padding is left out as before."""
    from lm.data import Rows, eval_batches, open_store, train_iterator

    store = open_store(small_store)
    L = 64
    rows = Rows("documents", pad_id=0, score_padding=score_padding, score_last=False)
    batch = next(train_iterator(store, seq_len=L, batch_size=4, seed=1, process_index=0, process_count=1, rows=rows))
    full = next(train_iterator(store, seq_len=L, batch_size=4, seed=1, process_index=0, process_count=1,
                               rows=Rows("documents", pad_id=0, score_padding=score_padding)))
    np.testing.assert_array_equal(batch["tokens"][:, :L], full["tokens"][:, :L])  # the same documents
    assert (batch["tokens"][:, L] == 0).all() and batch["loss_mask"].shape == (4, L)
    assert not batch["loss_mask"][:, -1].any()
    if score_padding:
        assert batch["loss_mask"][:, :-1].all()
    else:
        n = (full["loss_mask"].sum(axis=1) + 1).clip(max=L)  # document tokens in the row, at most seq_len
        np.testing.assert_array_equal(batch["loss_mask"], np.arange(1, L + 1)[None, :] < n[:, None])
    evals = eval_batches(store, seq_len=L, batch_size=1, max_batches=1, process_index=0, process_count=1, rows=rows)
    assert not evals[0]["loss_mask"][:, -1].any()


def test_window_rows_without_the_last_target(small_store):
    from lm.data import Rows, eval_batches, open_store, train_iterator

    store = open_store(small_store)
    rows = Rows(score_last=False)
    a = next(train_iterator(store, seq_len=32, batch_size=4, seed=2, process_index=0, process_count=1, rows=rows))
    b = next(train_iterator(store, seq_len=32, batch_size=4, seed=2, process_index=0, process_count=1))
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert "loss_mask" not in b
    assert a["loss_mask"].shape == (4, 32) and a["loss_mask"][:, :-1].all() and not a["loss_mask"][:, -1].any()
    ev = eval_batches(store, seq_len=32, batch_size=4, max_batches=2, process_index=0, process_count=1, rows=rows)
    assert all(int(e["loss_mask"].sum()) == 4 * 31 for e in ev)


def test_score_last_is_refused_for_a_synthetic_task():
    from lm.config import ConfigError

    with pytest.raises(ConfigError, match="data.score_last: a synthetic task chooses which targets it scores"):
        load_config("configs/mqar/softmax.yaml", ["data.score_last=false"])


@pytest.mark.parametrize("size, lr, warmup", [("300m", 2e-4, 500), ("1.2b", 6e-5, 1000)])
def test_the_paper_configs_default_to_the_papers_settings(size, lr, warmup):
    """Each setting of the paper's training script that the README's table lists, as the paper configs' value."""
    import glob

    for path in sorted(glob.glob(f"configs/paper_qkv/{size}/*.yaml")):
        c = load_config(path)
        m, d, t, o = c.model, c.data, c.train, c.optim
        assert (m.norm, m.norm_eps, m.bias, m.pos, m.tie_embeddings, m.mlp.kind) == (
            "layernorm", 1e-5, True, "learned", True, "gelu"), path
        assert (m.init_std, m.depth_scaled_init, m.dropout, m.embed_dropout, m.vocab_size) == (
            0.02, False, 0.1, 0.0, 50304), path
        assert (m.dtype, m.residual_dtype) == ("bfloat16", "float32"), path
        assert (d.seq_len, d.rows, d.pad_id, d.score_padding, d.score_last) == (2048, "documents", 50256, True,
                                                                                False), path
        assert (t.skip_grad_norm, t.retry_rejected, c.run.seed) == (100, True, 42), path
        assert (o.lr, o.warmup_steps, o.min_lr_ratio, o.schedule, o.weight_decay, o.wd_mask, o.b1, o.b2, o.clip) == (
            lr, warmup, 0.1, "cosine", 0.1, "all", 0.9, 0.95, 1.0), path
