"""Against a real SLURM (one node on localhost, tests/sweep/slurm_node.py; root only: it installs and starts SLURM's
daemons): the emitted submit_all.sh submits a tiny run with a one-minute time limit; SLURM's warning before the limit
makes the run save, the job requeues itself, and the run continues attempt after attempt to the losses of an
uninterrupted run, with every attempt's output kept in the run's log. And a job step of two tasks is one run."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lm.config import load_config
from lm.sweep.emit import emit
from lm.sweep.spec import load_sweep
from lm.tracking import read_metrics
from lm.train import train
from tests.sweep import slurm_node
from tests.sweep.conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.skipif(slurm_node.unavailable() is not None, reason=str(slurm_node.unavailable()))

# Longer than the first warning can come (within 45 s of the start) even on two fast idle cores, where 1500 steps
# ran at 40-50k tokens/s and finished in about 20 s, before any warning: 4000 steps.
STEPS = 4000
SETTINGS = {"train.steps": STEPS, "train.log_every": 100, "data.seq_len": 64, "data.batch_size": 8,
            "model.d_model": 64, "model.mlp.hidden": 128, "optim.warmup_steps": 10, "train.eval_steps": 2}


def _spec(store, out: Path) -> str:
    sets = dict(o.split("=", 1) for o in tiny_overrides(store, out, "x", **SETTINGS))
    for key in ("run.name", "run.out_dir"):
        sets.pop(key)
    common = ", ".join(f"{k}: {v}" for k, v in sets.items())
    # time 1 minute, the warning 15 s before it: SLURM checks limits every 30 s and warns at the first check past
    # 15 s (it may warn up to 30 s early, at the start), so the warning lands 15-45 s into an attempt.
    return f"""\
name: slurm_tiny
seeds: [0]
out_dir: {out}
common: {{{common}}}
configs:
  tiny: configs/tiny/softmax.yaml
cluster:
  slurm: {{gpus_per_node: 0, cpus_per_task: {min(2, os.cpu_count() or 1)}, time: "1", grace: 15,
          setup: ["export PATH={Path(sys.executable).parent}:$PATH"]}}
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The environment (SLURM_CONF) of a one-node SLURM, up for this module's tests."""
    try:
        slurm_node.install()
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"SLURM could not be installed: {e}")
    with slurm_node.slurm_node(tmp_path_factory.mktemp("slurm")) as env:
        yield env


@pytest.mark.slow
def test_a_time_limited_run_requeues_itself_to_the_uninterrupted_losses(slurm, small_store, tmp_path, write_spec):
    out = tmp_path / "runs"
    sweep = load_sweep(write_spec(_spec(small_store, out)))
    launch, _ = emit(sweep, "slurm", tmp_path / "launch")
    run_dir = out / "slurm_tiny" / "tiny-s0"
    res = subprocess.run(["bash", str(launch / "submit_all.sh")], cwd=tmp_path, env=slurm, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    job = re.search(r"array job (\d+)", res.stdout).group(1) + "_0"
    # The reference, uninterrupted, while SLURM runs its attempts.
    ref = train(load_config("configs/tiny/softmax.yaml", tiny_overrides(small_store, tmp_path, "ref", **SETTINGS)))
    assert ref.status == "finished"
    state = {}
    t0 = time.monotonic()
    while time.monotonic() - t0 < 900:
        state = slurm_node.job_state(slurm, job)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            break
        time.sleep(2)
    log = (out / "slurm_tiny" / "logs" / "tiny-s0.log").read_text()
    assert state.get("JobState") == "COMPLETED", (state, log[-3000:])
    attempts = re.findall(r"^== job \d+ \(attempt (\d+)\)", log, re.M)
    assert len(attempts) >= 2 and attempts == [str(i) for i in range(1, len(attempts) + 1)], log[-3000:]
    assert int(state["Restarts"]) == len(attempts) - 1
    assert log.count("time limit in 15 s: stopping the run to save it") == len(attempts) - 1
    assert "resuming" in log and "jax 0.11.2 sees" in log
    # Every step the reference logged, with its loss; an interrupted attempt also logged the step it stopped at.
    losses = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}
    want = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if "loss" in r}
    assert {s: losses.get(s) for s in want} == want
    final = [r["eval_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r]
    assert final[-1:] == [r["eval_loss"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")
                          if "eval_loss" in r][-1:]


@pytest.mark.slow
def test_a_job_step_of_two_tasks_is_one_run(slurm, small_store, tmp_path):
    """`srun -n 2 attnlab train`: the two tasks find their place through jax's SLURM detection, meet, and train one
    run (process 0 alone writes its metrics) whose every process says it is alive."""
    over = tiny_overrides(small_store, tmp_path, "two", **{"train.steps": 4, "mesh.data": 2, "data.batch_size": 8})
    env = {**slurm, "PATH": f"{Path(sys.executable).parent}:{slurm['PATH']}"}
    res = subprocess.run(["srun", "-n", "2", "--cpus-per-task=1", "attnlab", "train", "configs/tiny/softmax.yaml",
                          *sum((["--set", o] for o in over), []), "--cpu-devices", "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "jax 0.11.2 sees 2 cpu device(s) (cpu) over 2 processes, this one is process 0" in res.stdout
    assert "process 0 of 2: step 1" in res.stdout and "process 1 of 2: step 1" in res.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
