import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.checkpoint import Checkpointer
from lm.config import load_config
from lm.tracking import read_metrics
from lm.train import build, make_train_step, train
from tests.lm.conftest import tiny_overrides

TINY = "configs/tiny/softmax.yaml"
ROOT = Path(__file__).resolve().parents[2]


def _cfg(store, run_dir, name="t", **extra):
    return load_config(TINY, tiny_overrides(store, run_dir, name, **extra))


def _params(run_dir: Path, cfg):
    setup = build(cfg)
    ck = Checkpointer(run_dir / "checkpoints", keep=5)
    try:
        step, state, meta, data_state = ck.restore_latest(setup.abstract_state())
    finally:
        ck.close()
    return step, jax.device_get(state["params"]), meta


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_train_learns_and_logs(small_store, tmp_path):
    cfg = _cfg(small_store, tmp_path, **{"train.steps": 30, "train.eval_every": 10})
    res = train(cfg)
    assert res.status == "finished" and res.step == 30
    rows = read_metrics(res.run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 31))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "rejected_steps"):
        assert key in train_rows[0]
    assert [e["step"] for e in evals] == [10, 20, 30]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 1.0  # byte-level loss starts near ln(256)=5.5
    assert evals[-1]["eval_bpb"] < 8 and evals[-1]["eval_ppl"] > 1
    assert (res.run_dir / "config.yaml").exists()
    assert load_config(res.run_dir / "config.yaml").to_dict() == cfg.to_dict()


@pytest.mark.parametrize("saving", ["sync", "async"])
def test_resume_is_bit_identical(small_store, tmp_path, saving):
    """2N steps straight == N steps, stop, resume, N steps: same parameters bit for bit, same losses. With
    background (async) checkpoint writes every 2 steps too."""
    extra = {"train.async_checkpoint": "true", "train.ckpt_every": 2} if saving == "async" else {}
    a = _cfg(small_store, tmp_path, "straight", **extra)
    train(a)
    b = _cfg(small_store, tmp_path, "resumed", **extra)
    first = train(b, max_steps_this_run=6)
    assert first.step == 6
    second = train(b)
    assert second.step == 12
    sa, pa, _ = _params(tmp_path / "straight", a)
    sb, pb, _ = _params(tmp_path / "resumed", b)
    assert sa == sb == 12
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(x, y)
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "resumed")
    if saving == "async":  # the time saves held the loop is logged with the next record
        stalls = [r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "ckpt_stall_s" in r]
        assert [r["step"] for r in stalls] == [3, 5, 7, 9, 11] and all(r["ckpt_stall_s"] > 0 for r in stalls)


def test_resume_says_which_settings_changed(small_store, tmp_path):
    from rich.console import Console

    train(_cfg(small_store, tmp_path, "chg", **{"train.steps": 4}))
    console = Console(record=True, width=300)
    train(_cfg(small_store, tmp_path, "chg", **{"train.steps": 6, "optim.lr": 1e-3}), console=console)
    out = console.export_text()
    assert "resuming with changed settings, which apply from step 4 on: optim.lr: 0.003 -> 0.001; " \
           "train.steps: 4 -> 6" in out
    # A longer run stretches the cosine schedule: the rate at the resumed step jumps, and the run says so.
    assert "the learning-rate schedule (cosine) is recomputed: train.steps 4 -> 6 spreads it over the new length, " \
           "so the learning rate at step 4 goes from 0.0003 to 0.00055 (up 1.83x)" in out
    # The implementation choices: one line per op and implementation, naming the layers.
    assert "softmax_attention -> xla in 2 layer(s) [layer0.softmax, layer1.softmax]: on the CPU Pallas kernels run " \
           "only interpreted" in out


def test_finished_run_is_not_retrained(small_store, tmp_path):
    cfg = _cfg(small_store, tmp_path)
    train(cfg)
    again = train(cfg)
    assert again.status == "already_finished" and again.step == 12


def test_resume_refuses_a_different_model(small_store, tmp_path):
    from lm.train import RunError

    train(_cfg(small_store, tmp_path, "x", **{"train.steps": 2}))
    with pytest.raises(RunError, match="model.d_model"):
        train(_cfg(small_store, tmp_path, "x", **{"train.steps": 4, "model.d_model": 64}))


def test_corrupted_newest_checkpoint_falls_back(small_store, tmp_path):
    cfg = _cfg(small_store, tmp_path, "c", **{"train.ckpt_every": 4})
    train(cfg, max_steps_this_run=8)
    ck_dir = tmp_path / "c" / "checkpoints"
    assert (ck_dir / "8").exists() and (ck_dir / "4").exists()
    for f in (ck_dir / "8" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    warnings = []
    setup = build(cfg)
    ck = Checkpointer(ck_dir, keep=3, warn=warnings.append)
    step, *_ = ck.restore_latest(setup.abstract_state())
    ck.close()
    assert step == 4
    assert warnings and "step 8" in warnings[0]
    assert any((tmp_path / "c" / "checkpoints_corrupt").iterdir())  # kept, not deleted


def test_run_with_history_but_no_usable_checkpoint_needs_restart(small_store, tmp_path):
    """Every checkpoint corrupt: the first call says so; calling again must not start over silently and must
    never truncate metrics.jsonl; --restart starts from 0 and keeps the old metrics beside."""
    from lm.checkpoint import CheckpointError
    from lm.train import RunError

    cfg = _cfg(small_store, tmp_path, "h", **{"train.ckpt_every": 4})
    train(cfg, max_steps_this_run=8)
    run = tmp_path / "h"
    logged = (run / "metrics.jsonl").read_text()
    for f in (run / "checkpoints").rglob("*"):
        if f.is_file() and "state" in f.parts:
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="none of the checkpoints"):
        train(cfg)
    for _ in range(2):
        with pytest.raises(RunError, match=r"has history \(metrics.jsonl with 9 records; 2 unusable checkpoint.*--restart"):
            train(cfg)
        assert (run / "metrics.jsonl").read_text() == logged
    res = train(cfg, restart=True)
    assert res.status == "finished" and res.step == 12
    (kept,) = run.glob("metrics.2*.jsonl")
    assert kept.read_text() == logged
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == list(range(1, 13))


def test_killed_before_its_first_save_starts_again_without_a_flag(small_store, tmp_path):
    """Metrics but no checkpoint ever (a kill before the first save): no trained progress is lost by starting
    over, so the same command starts from step 0; the old metrics are kept beside, not truncated."""
    cfg = _cfg(small_store, tmp_path, "early", **{"train.steps": 4})
    run = tmp_path / "early"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.5}\n{"step": 2, "loss": 5.4}\n')
    res = train(cfg)
    assert res.status == "finished" and res.step == 4
    (kept,) = run.glob("metrics.2*.jsonl")
    assert kept.read_text() == '{"step": 1, "loss": 5.5}\n{"step": 2, "loss": 5.4}\n'
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


def test_second_writer_is_refused_with_the_owners_pid(small_store, tmp_path):
    """While one process trains in a run directory, a second `attnlab train` on it exits at once, naming the
    owner; the first one's files are untouched. The lock dies with its owner (here: kill -9)."""
    cfg_args = [a for o in tiny_overrides(small_store, tmp_path, "locked", **{"train.steps": 100000}) for a in ("--set", o)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    owner = subprocess.Popen([sys.executable, "-m", "lm.cli", "train", TINY, *cfg_args], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run = tmp_path / "locked"
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
            assert owner.poll() is None and time.time() < deadline, owner.stdout.read() if owner.poll() else "slow"
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "-m", "lm.cli", "train", TINY, *cfg_args], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"is in use by pid {owner.pid} (attnlab train" in second.stderr + second.stdout
        assert owner.poll() is None, "the first writer must keep running"
    finally:
        owner.kill()
        owner.wait()
    # The owner died without cleaning up: the lock went with it, and the run resumes.
    res = train(_cfg(small_store, tmp_path, "locked", **{"train.steps": 100000}), max_steps_this_run=2)
    assert res.status == "finished" and res.step >= 2


def test_failed_start_leaves_no_empty_run_directory(small_store, tmp_path):
    from lm.data import DataError

    with pytest.raises(DataError):
        train(_cfg(small_store, tmp_path, "nodata", **{"data.source": str(tmp_path / "missing")}))
    assert not (tmp_path / "nodata").exists()


def test_divergence_is_caught_before_the_weights_are_saved(small_store, tmp_path):
    """lr=10 ruins the weights within a few steps while every number stays finite (loss in the hundreds):
    the run stops as diverged, never saves a state from after the loss left its range, and logs grad_norm
    as a number or null."""
    cfg = _cfg(small_store, tmp_path, "div", **{"optim.lr": 10.0, "optim.warmup_steps": 5, "train.steps": 60,
                                                   "train.ckpt_every": 2})
    res = train(cfg)
    assert res.status == "diverged" and "lower optim.lr" in res.message
    rows = [r for r in read_metrics(res.run_dir / "metrics.jsonl") if "loss" in r]
    assert all(r["grad_norm"] is None or isinstance(r["grad_norm"], float) for r in rows)
    bad = min(r["step"] for r in rows if r["loss"] > 3 * 5.0)
    saved = sorted(int(d.name) for d in (res.run_dir / "checkpoints").iterdir() if d.name.isdigit())
    assert saved and max(saved) < bad, (saved, bad)
    assert f"the newest checkpoint (step {max(saved)})" in res.message
    # Off switch: the same run with the check disabled trains on to the end.
    off = train(_cfg(small_store, tmp_path, "div-off", **{"optim.lr": 10.0, "optim.warmup_steps": 5,
                                                           "train.steps": 20, "train.diverge_ratio": 0}))
    assert off.status == "finished"


def test_corpus_too_small_for_eval_fails_before_compiling(tmp_path):
    """A small own corpus: the eval split's size is checked before the step compiles or W&B starts, and the
    message names the flag that fixes it."""
    from lm import data as lmdata
    from lm.data import DataError

    txt = tmp_path / "txt"
    txt.mkdir()
    for i in range(60):
        (txt / f"d{i}.txt").write_text(f"note {i}: " + "some words here " * 40)
    store = lmdata.prepare([str(txt)], "byte", tmp_path / "store", log=lambda *_: None)
    cfg = _cfg(store, tmp_path, "small", **{"data.seq_len": 256, "data.batch_size": 16, "wandb.mode": "offline"})
    with pytest.raises(DataError, match="--val-fraction"):
        train(cfg)
    assert not (tmp_path / "small").exists(), "nothing compiled, nothing written: not even a W&B directory"


def test_grad_accum_matches_single_batch(small_store, tmp_path):
    one = _cfg(small_store, tmp_path, "g1", **{"train.steps": 3})
    two = _cfg(small_store, tmp_path, "g2", **{"train.steps": 3, "train.grad_accum": 2})
    train(one)
    train(two)
    la, lb = _losses(tmp_path / "g1"), _losses(tmp_path / "g2")
    for s in la:
        assert abs(la[s] - lb[s]) <= 1e-5 * abs(la[s])


def test_nonfinite_step_is_rejected_and_counted(small_store, tmp_path):
    cfg = _cfg(small_store, tmp_path)
    setup = build(cfg)
    step = jax.jit(make_train_step(cfg, setup.mdef, setup.tx, setup.schedule))
    state = jax.jit(setup.fresh_state)()
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(0, 256, (4, 33)), jnp.int32)}
    # Poison one weight: the loss and every gradient become NaN.
    bad = jax.tree.map(lambda x: x, state)
    bad["params"]["final_norm"]["scale"] = bad["params"]["final_norm"]["scale"].at[0].set(jnp.nan)
    new, m = step(bad, batch)
    assert not bool(m["ok"]) and int(m["rejected"]) == 1 and int(m["rejected_run"]) == 1
    for x, y in zip(jax.tree.leaves((bad["params"], bad["opt"])), jax.tree.leaves((new["params"], new["opt"]))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    good, m2 = step(state, batch)
    assert bool(m2["ok"]) and int(m2["rejected_run"]) == 0


def test_run_stops_after_repeated_rejections(small_store, tmp_path):
    # A learning rate this large makes the first update overflow; every later step is non-finite.
    cfg = _cfg(small_store, tmp_path, "div", **{"optim.lr": 1e30, "optim.warmup_steps": 0, "optim.clip": "null",
                                                "train.max_rejected": 3, "train.steps": 50})
    res = train(cfg)
    assert res.status == "diverged" and "in a row" in res.message
    assert res.step < 50
    rows = [r for r in read_metrics(res.run_dir / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["rejected_steps"] >= 3
    # Non-finite values are JSON null, never the string "nan".
    assert rows[-1]["grad_norm"] is None and rows[-1]["loss"] is None
    assert '"nan"' not in (res.run_dir / "metrics.jsonl").read_text().lower()
    assert (res.run_dir / "checkpoints" / str(res.step)).exists()


def _cli(args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "lm.cli", *args], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for(pred, timeout=120.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.05)
    return False


def _kill_after_checkpoint_then_resume(store, tmp_path, name, kill_after: int, **extra) -> str:
    """`attnlab train` (40 steps, a checkpoint every 5) killed with SIGKILL once checkpoint `kill_after`
    exists, then the same command again to the end; returns the second run's output."""
    args = ["train", TINY, *sum((["--set", o] for o in tiny_overrides(
        store, tmp_path, name, **{"train.steps": 40, "train.ckpt_every": 5, **extra})), [])]
    p = _cli(args)
    ck = tmp_path / name / "checkpoints"
    assert _wait_for(lambda: (ck / str(kill_after)).exists() or p.poll() is not None), "no checkpoint appeared"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    p2 = _cli(args)
    out, _ = p2.communicate(timeout=300)
    assert p2.returncode == 0, out
    return out


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_losses(small_store, tmp_path):
    ref = _cfg(small_store, tmp_path, "ref", **{"train.steps": 40})
    train(ref)
    out = _kill_after_checkpoint_then_resume(small_store, tmp_path, "killed", 10)
    assert "resuming" in out
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "ref")


@pytest.mark.slow
def test_wandb_history_survives_sigkill(small_store, tmp_path):
    """kill -9 loses what W&B buffered; the resumed run replays it from metrics.jsonl, so the offline files
    together hold every logged step with its logged value."""
    from tests.lm.wandb_reader import history

    os.environ.pop("WANDB_API_KEY", None)
    out = _kill_after_checkpoint_then_resume(small_store, tmp_path, "wbkill", 15, **{"wandb.mode": "offline"})
    assert "W&B: replayed" in out
    logged: dict[int, float] = {}
    for f in sorted((tmp_path / "wbkill" / "wandb").glob("offline-run-*/*.wandb")):
        for row in history(f):
            if "loss" in row:
                logged.setdefault(int(row["_step"]), float(row["loss"]))
    assert logged == pytest.approx(_losses(tmp_path / "wbkill"))


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(small_store, tmp_path):
    args = ["train", TINY, *sum((["--set", o] for o in tiny_overrides(
        small_store, tmp_path, "term", **{"train.steps": 100000})), [])]
    p = _cli(args)
    metrics = tmp_path / "term" / "metrics.jsonl"
    assert _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    assert "SIGTERM" in out
    steps = [int(d.name) for d in (tmp_path / "term" / "checkpoints").iterdir() if d.name.isdigit()]
    assert steps and max(steps) >= 3
    assert max(steps) == max(_losses(tmp_path / "term"))


@pytest.mark.slow
def test_eight_devices_match_one(small_store, tmp_path):
    """data=2, fsdp=2, tensor=2 on 8 simulated CPU devices gives the 1-device losses."""
    script = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from lm.config import load_config
from lm.train import train
from lm.tracking import read_metrics
from tests.lm.conftest import tiny_overrides
import jax
over = tiny_overrides({str(small_store)!r}, {str(tmp_path)!r}, sys.argv[1], **{{"train.steps": 5, "data.batch_size": 8,
        "model.mixers.softmax.n_heads": 4, "model.mixers.softmax.n_kv_heads": 2}})
over += sys.argv[2:]
res = train(load_config({TINY!r}, over))
print(json.dumps({{"devices": jax.device_count(),
                  "losses": [r["loss"] for r in read_metrics(res.run_dir / "metrics.jsonl") if "loss" in r]}}))
"""
    def run(name, devices, *over):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
        out = subprocess.run([sys.executable, "-c", script, name, *over], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    one = run("one", 1)
    eight = run("eight", 8, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    assert one["devices"] == 1 and eight["devices"] == 8
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-5)


def test_wandb_offline_run_holds_the_losses(small_store, tmp_path):
    cfg = _cfg(small_store, tmp_path, "wb", **{"wandb.mode": "offline", "train.steps": 4})
    os.environ.pop("WANDB_API_KEY", None)
    res = train(cfg)
    runs = list((res.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = list(runs[0].glob("*.wandb"))
    assert files, "no offline .wandb file"
    from tests.lm.wandb_reader import history

    losses = {int(r["_step"]): float(r["loss"]) for r in history(files[0]) if "loss" in r}
    expected = _losses(res.run_dir)
    assert losses == pytest.approx(expected)
    # Resume continues the same W&B run.
    meta_id = _params(res.run_dir, cfg)[2]["wandb_id"]
    assert runs[0].name.endswith(meta_id)


def test_resume_check_ignores_keys_added_since_and_names_real_changes(small_store, tmp_path):
    from lm.train.rundir import _config_mismatch

    cfg = _cfg(small_store, tmp_path)
    saved = cfg.to_dict()
    del saved["model"]["mixers"]["softmax"]["share"]  # a checkpoint written before `share` existed
    del saved["model"]["dropout"]
    assert _config_mismatch(saved, cfg) is None
    other = _cfg(small_store, tmp_path, **{"model.mixers.softmax.n_kv_heads": 1})
    assert "model.mixers.softmax.n_kv_heads" in _config_mismatch(cfg.to_dict(), other)


def test_bf16_compute_keeps_fp32_master_weights_and_accumulators(small_store, tmp_path):
    """model.dtype=bfloat16: parameters, optimizer moments and the grad_accum accumulators stay fp32; the matmuls
    take bf16 operands."""
    from lm.train.setup import build
    from lm.train.step import make_train_step

    cfg = _cfg(small_store, tmp_path, "bf16", **{"model.dtype": "bfloat16", "train.grad_accum": 2})
    setup = build(cfg)
    float_leaves = [x for x in jax.tree.leaves(setup.state_shapes) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert float_leaves and all(x.dtype == jnp.float32 for x in float_leaves)
    step = make_train_step(cfg, setup.mdef, setup.tx, setup.schedule)
    batch = {"tokens": jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len + 1), jnp.int32)}
    jaxpr = jax.make_jaxpr(step)(setup.state_shapes, batch)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1  # the micro-batch loop
    # Its outputs: the accumulated gradients (one per parameter, parameter-shaped) and loss sums, all fp32.
    param_shapes = sorted(tuple(x.shape) for x in jax.tree.leaves(setup.state_shapes["params"]))
    outs = [v.aval for v in scans[0].outvars]
    accumulated = sorted(tuple(a.shape) for a in outs if tuple(a.shape) in set(param_shapes))
    assert len(accumulated) >= len(param_shapes)
    assert all(a.dtype == jnp.float32 for a in outs if jnp.issubdtype(a.dtype, jnp.floating))

    from jax.extend.core import jaxprs_in_params

    def dots(jx, out):
        for e in jx.eqns:
            if e.primitive.name == "dot_general":
                out.append(tuple(v.aval.dtype for v in e.invars))
            for sub in jaxprs_in_params(e.params):
                dots(sub, out)
        return out

    operand_dtypes = dots(jaxpr.jaxpr, [])
    assert (jnp.bfloat16, jnp.bfloat16) in operand_dtypes


def test_divergence_needs_both_the_ratio_and_the_margin():
    """A solved task's loss blips from 0.016 to 0.06 (3.6x): not a divergence. Text loss 2 -> 7: one."""
    from lm.train.loop import _DivergenceWatch

    w = _DivergenceWatch(3.0, 1.0)
    assert not w.check(1, [{"loss": 0.016}] * 50 + [{"loss": 0.06}])
    w = _DivergenceWatch(3.0, 1.0)
    assert w.check(1, [{"loss": 2.0}] * 10 + [{"loss": 7.0}]) and "step 11" in w.why
    w = _DivergenceWatch(3.0, 0.0)  # margin 0: the ratio alone, as before
    assert w.check(1, [{"loss": 0.016}] * 50 + [{"loss": 0.06}])
