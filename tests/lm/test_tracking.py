"""lm.tracking.WandbRun's init: a run id still "in use" in W&B's service (a killed process this run resumes)
is retried; W&B that cannot start at all leaves the run training without it, with a warning."""
from __future__ import annotations

import wandb

from lm.config import WandbConfig
from lm.tracking import WandbRun


class _FlakyInit:
    def __init__(self, failures: int):
        self.failures, self.calls, self.teardowns = failures, 0, 0

    def init(self, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("run ID abc is in use")
        return "a run"

    def teardown(self):
        self.teardowns += 1


def _start(monkeypatch, tmp_path, fake):
    monkeypatch.setattr(wandb, "init", fake.init)
    monkeypatch.setattr(wandb, "teardown", fake.teardown)
    monkeypatch.setattr("lm.tracking.time.sleep", lambda s: None)
    return WandbRun(WandbConfig(mode="offline"), tmp_path, "abc", {})


def test_an_id_in_use_is_retried_after_a_teardown(monkeypatch, tmp_path, capsys):
    fake = _FlakyInit(failures=2)
    run = _start(monkeypatch, tmp_path, fake)
    assert run.run == "a run" and fake.calls == 3 and fake.teardowns == 2
    assert "warning" not in capsys.readouterr().err


def test_wandb_that_never_starts_leaves_the_run_without_it(monkeypatch, tmp_path, capsys):
    fake = _FlakyInit(failures=99)
    run = _start(monkeypatch, tmp_path, fake)
    assert run.run is None and fake.calls == 3
    err = capsys.readouterr().err
    assert "W&B offline init failed (RuntimeError: run ID abc is in use)" in err and "metrics.jsonl" in err
