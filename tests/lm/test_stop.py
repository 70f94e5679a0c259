"""Stop signals from the first line of `attnlab train`: a SIGTERM or SIGHUP that arrives while the run is still
starting (importing jax, restoring, before the step is compiled) ends it with exit status 0 and one line, not with
Python's default death by signal; SIGHUP mid-run saves like SIGTERM."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lm.tracking import read_metrics
from tests.lm.conftest import tiny_overrides
from tests.lm.test_train import _wait_for

ROOT = Path(__file__).resolve().parents[2]
TINY = "configs/tiny/softmax.yaml"


def _train(store, tmp_path, name, **extra) -> subprocess.Popen:
    """`attnlab train` with SIGHUP at its default: under `nohup` the test's own SIGHUP is ignored, and train keeps
    an ignored SIGHUP ignored (lm/stop.py), as `nohup attnlab train` must."""
    args = sum((["--set", o] for o in tiny_overrides(store, tmp_path, name, **extra)), [])
    return subprocess.Popen([sys.executable, "-m", "lm.cli", "train", TINY, *args], cwd=ROOT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))


def _catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler installed for `signum` (Linux: SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads signal handlers from /proc (Linux)")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_start_up_exits_cleanly(small_store, tmp_path, signum):
    p = _train(small_store, tmp_path, "early")
    # As soon as the handler is in: the CLI's first lines, long before jax is imported.
    assert _wait_for(lambda: p.poll() is not None or _catches(p.pid, signum)), "no handler was installed"
    assert (tmp_path / "early").exists() is False  # still starting
    p.send_signal(signum)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    name = signal.Signals(signum).name
    assert f"received {name} before the first step: nothing new to save (resumes from step 0), exiting" in out, out
    assert "Traceback" not in out and not list((tmp_path / "early" / "checkpoints").iterdir())


@pytest.mark.slow
def test_sighup_mid_run_saves_like_sigterm(small_store, tmp_path):
    p = _train(small_store, tmp_path, "hup", **{"train.steps": 100000})
    metrics = tmp_path / "hup" / "metrics.jsonl"
    assert _wait_for(lambda: p.poll() is not None or (metrics.exists() and len(metrics.read_text().splitlines()) >= 3),
                 timeout=300)
    p.send_signal(signal.SIGHUP)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and "received SIGHUP: saved at step" in out, out
    saved = max(int(d.name) for d in (tmp_path / "hup" / "checkpoints").iterdir() if d.name.isdigit())
    assert saved == max(r["step"] for r in read_metrics(metrics) if "loss" in r)
