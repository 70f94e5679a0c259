"""One run as two processes (jax.distributed over gloo on localhost, 4 simulated CPU devices each), and
checkpoints restored onto other mesh shapes; each compared with a 1-process, 1-device run of the same global
batch."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lm.distributed import Launch, LaunchError, resolve
from lm.tracking import read_metrics
from tests.lm.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
TINY = "configs/tiny/softmax.yaml"
STEPS = 8


def _args(store, out: Path, name: str, mesh: tuple[int, int, int], **extra) -> list[str]:
    over = tiny_overrides(store, out, name, **{
        "train.steps": STEPS, "train.ckpt_every": 4, "data.batch_size": 8, "model.mixers.softmax.n_heads": 4,
        "model.mixers.softmax.n_kv_heads": 2, "mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2],
        **extra})
    return ["train", TINY, *sum((["--set", o] for o in over), [])]


def _env():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the device count comes from --cpu-devices
    return env


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lm.cli", *args], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(p: subprocess.Popen) -> str:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(args: list[str]) -> list[str]:
    port = _free_port()
    procs = [_start([*args, "--cpu-devices", "4", "--coordinator", f"localhost:{port}", "--num-processes", "2",
                     "--process-id", str(i)]) for i in range(2)]
    return [_finish(p) for p in procs]


def _records(run_dir: Path) -> tuple[dict[int, float], list[float]]:
    recs = read_metrics(run_dir / "metrics.jsonl")
    losses = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    assert len(losses) == len(dict(losses)), "a step was logged twice: more than one process wrote metrics"
    return dict(losses), [r["eval_loss"] for r in recs if "eval_loss" in r]


@pytest.mark.slow
def test_two_processes_equal_one_and_restore_on_other_meshes(small_store, tmp_path):
    # The reference: one process, one device, the same global batch of 8 rows.
    ref = _start([*_args(small_store, tmp_path, "ref", (1, 1, 1)), "--cpu-devices", "1"])
    # Two processes x 4 devices on data=2 x fsdp=2 x tensor=2, W&B offline: only process 0 may log.
    outs = _two_processes([*_args(small_store, tmp_path, "dft", (2, 2, 2), **{"wandb.mode": "offline"})])
    _finish(ref)
    ref_losses, ref_eval = _records(tmp_path / "ref")
    assert sorted(ref_losses) == list(range(1, STEPS + 1))

    losses, evals = _records(tmp_path / "dft")
    assert sorted(losses) == sorted(ref_losses)
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [ref_losses[s] for s in sorted(losses)],
                               rtol=2e-6)
    np.testing.assert_allclose(evals, ref_eval, rtol=2e-6)
    assert "eval at step 8" in outs[0] and "eval at step" not in outs[1]  # process 1 prints nothing of its own
    assert len(list((tmp_path / "dft" / "wandb").glob("offline-run-*"))) == 1
    assert not list((tmp_path / "dft").glob("*process1*"))

    # Saved by two processes on data=4 x fsdp=2; step 4 restored on fsdp=8 (one process) and on one device.
    _two_processes(_args(small_store, tmp_path, "d4f2", (4, 2, 1)))
    assert sorted(int(p.name) for p in (tmp_path / "d4f2" / "checkpoints").iterdir()) == [4, 8]
    for name, mesh, devices in (("on_fsdp8", (1, 8, 1), 8), ("on_one", (1, 1, 1), 1)):
        shutil.copytree(tmp_path / "d4f2", tmp_path / name, ignore=shutil.ignore_patterns(".lock"))
        shutil.rmtree(tmp_path / name / "checkpoints" / "8")
        out = _finish(_start([*_args(small_store, tmp_path, name, mesh), "--cpu-devices", str(devices)]))
        assert "resuming" in out and "from step 4" in out, out
        resumed, evals = _records(tmp_path / name)
        assert sorted(resumed) == list(range(1, STEPS + 1))
        np.testing.assert_allclose([resumed[s] for s in range(5, STEPS + 1)],
                                   [ref_losses[s] for s in range(5, STEPS + 1)], rtol=2e-6, err_msg=name)
        np.testing.assert_allclose(evals, ref_eval, rtol=2e-6, err_msg=name)


@pytest.mark.slow
def test_a_mesh_whose_tensor_axis_spans_processes_is_refused(small_store, tmp_path):
    port = _free_port()
    procs = [_start([*_args(small_store, tmp_path, "bad", (1, 1, 8)), "--cpu-devices", "4", "--coordinator",
                     f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 2, out
        assert "error: mesh" in out and "mesh.tensor within one process" in out, out
        assert "Traceback" not in out
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_launch_from_flags_env_and_clusters():
    assert resolve(environ={}) == Launch("single")
    assert resolve("h:1234", 2, 1, environ={}) == Launch("flags", "h:1234", 2, 1)
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:9999", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert resolve(environ=env) == Launch("env", "10.0.0.1:9999", 4, 3)
    assert resolve("h:1", 2, 0, environ=env).source == "flags"  # flags win over the environment
    assert resolve(environ={"SLURM_NTASKS": "8", "SLURM_JOB_ID": "77"}).source == "slurm"
    assert resolve(environ={"SLURM_NTASKS": "1", "SLURM_JOB_ID": "77"}).source == "single"
    assert resolve(environ={"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}).source == "tpu"
    assert resolve(environ={"TPU_WORKER_HOSTNAMES": "w0"}).source == "single"
    assert resolve(cpu_devices=4, environ={}).cpu_devices == 4


@pytest.mark.parametrize("flags, env, needle", [
    (("h:1", None, 0), {}, "--num-processes missing"),
    ((None, None, None), {"JAX_NUM_PROCESSES": "2"}, "JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID missing"),
    (("nohost", 2, 0), {}, "is not HOST:PORT"),
    (("h:99999", 2, 0), {}, "is not HOST:PORT"),
    (("h:1", 0, 0), {}, "--num-processes must be a positive integer"),
    (("h:1", 2, 2), {}, "--process-id must be an integer in 0..1"),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES must be a positive integer"),
])
def test_bad_launch_settings_name_the_setting(flags, env, needle):
    with pytest.raises(LaunchError, match=needle):
        resolve(*flags, environ=env)


def test_bad_launch_flag_is_one_line_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lm.cli", "train", TINY, "--num-processes", "2", "--process-id", "0"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: --coordinator missing: a multi-process run needs all of "
                                               "--coordinator, --num-processes, --process-id"]


@pytest.mark.parametrize("process_id, needle", [
    (0, "error: only 1 of 2 processes arrived within 3 s (missing process id(s) 1); start them with --coordinator"),
    (1, "error: process 0 did not answer at localhost:"),
])
def test_processes_that_never_meet_time_out_with_one_line(process_id, needle):
    out = subprocess.run([sys.executable, "-m", "lm.cli", "train", TINY, "--coordinator", f"localhost:{_free_port()}",
                          "--num-processes", "2", "--process-id", str(process_id), "--init-timeout", "3"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith(needle), out.stderr
    assert "--init-timeout" in out.stderr


def test_processes_that_disagree_on_the_count_are_told_so():
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "lm.cli", "train", TINY, "--coordinator", f"localhost:{port}",
                               "--num-processes", n, "--process-id", i, "--init-timeout", "60"], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n, i in (("2", "0"), ("3", "1"))]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, err
        assert err.strip() == "error: process 1 was started with 3 processes, process 0 with 2", err


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_a_process_that_dies_ends_the_others_with_one_line(small_store, tmp_path, victim):
    """kill -9 one of two processes mid-run: the other prints which process is gone, the last checkpoint and to
    rerun all processes, and exits 4 at once, not with jax's runtime abort a minute later after pages of gRPC
    errors. Before that it printed its own progress line. When process 0 dies, jax's coordination service dies with
    it and the runtime in process 1 logs that in the same instant: its lines come first, then the run's."""
    port = _free_port()
    args = _args(small_store, tmp_path, "peer", (2, 1, 1), **{"train.steps": 100000, "train.ckpt_every": 3})
    procs = [subprocess.Popen([sys.executable, "-m", "lm.cli", *args, "--cpu-devices", "1", "--coordinator",
                               f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)], cwd=ROOT,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    ckpts = tmp_path / "peer" / "checkpoints"
    t0 = time.monotonic()
    # Once checkpoint 6 is on disk, every process has finished saving checkpoint 3 (step 4 waited for it).
    while not (ckpts.is_dir() and any(p.name.isdigit() and int(p.name) >= 6 for p in ckpts.iterdir())):
        assert time.monotonic() - t0 < 300 and all(p.poll() is None for p in procs), "no checkpoint appeared"
        time.sleep(0.2)
    procs[victim].kill()
    procs[victim].wait()
    survivor = procs[1 - victim]
    t_kill = time.monotonic()
    out, err = survivor.communicate(timeout=120)
    waited = time.monotonic() - t_kill
    assert survivor.returncode == 4, (out, err)
    line = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: process {victim} of 2 is gone \(its process ended or its host went down\); the "
                        rf"last checkpoint is step \d+ \(this one, process {1 - victim}, was at step \d+\): rerun "
                        rf"all 2 processes to resume", line), line
    assert waited < 30, f"the survivor took {waited:.0f} s to stop"
    assert victim == 0 or len(err.strip().splitlines()) == 1, err
    assert f"process {1 - victim} of 2: step " in out
    saved = int(re.search(r"last checkpoint is step (\d+)", line).group(1))
    assert saved in {int(p.name) for p in ckpts.iterdir() if p.name.isdigit()}


@pytest.mark.slow
def test_a_process_that_stops_with_an_error_alone_ends_the_others(small_store, tmp_path):
    """Process 1 alone cannot open its data: it prints its own error (exit 2); process 0, which would wait for it
    in the run's first collective, says which process stopped and exits 4 after the grace period."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "lm.cli", *_args(small_store, tmp_path, "half", (2, 1, 1)),
                               *(["--set", f"data.source={tmp_path / 'missing'}"] if i else []), "--cpu-devices", "1",
                               "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    (_, err0), (_, err1) = (p.communicate(timeout=300) for p in procs)
    assert (procs[0].returncode, procs[1].returncode) == (4, 2), (err0, err1)
    assert err1.strip().startswith(f"error: data.source '{tmp_path / 'missing'}' does not exist"), err1
    assert err0.strip().splitlines()[-1].startswith("error: process 1 of 2 stopped with an error (its own output says "
                                                    "which); no checkpoint was saved yet"), err0


@pytest.mark.slow
def test_a_run_directory_the_hosts_do_not_share_is_refused(small_store, tmp_path):
    """Process 1 looks for the run directory somewhere process 0 does not write (as on a host whose disk it is not):
    both refuse in one line before anything is written, rather than splitting checkpoints over the hosts' disks."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "lm.cli", *_args(small_store, tmp_path / f"disk{i}", "run",
                                                                        (2, 1, 1)), "--cpu-devices", "1",
                               "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2, err
        assert err.strip().splitlines()[-1] == (
            f"error: run.out_dir {tmp_path / 'disk0'} is not shared by the hosts of this run (process 1 does not see "
            f"what process 0 writes there), so checkpoints would be split over their disks; put it on a file system "
            f"every host mounts, or on object storage (gs://bucket/runs)").replace(
            str(tmp_path / "disk0"), str(tmp_path / f"disk{procs.index(p)}")), err
    assert not (tmp_path / "disk0" / "run" / "checkpoints").exists()
