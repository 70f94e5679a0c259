"""`attnlab sweep SPEC --local`: runs train in order, the manifest follows them, rerunning trains only what has
not finished; a diverged or interrupted run stops the sweep; the CLI's mistakes are one `error:` line."""
import argparse
import json
import os
import signal
from pathlib import Path

import pytest

import lm.cli
import lm.train
from lm.config import dump_config
from lm.sweep.cli import add_parser, cmd_sweep
from lm.sweep.local import manifest, previous_statuses, write_manifest
from lm.sweep.spec import load_sweep
from lm.train.rundir import RunResult
from tests.sweep.conftest import tiny_overrides

KEYS = {"name", "group", "baseline", "description", "spec", "seeds", "runs", "configs", "axis", "metric",
        "contrasts"}
RUN_KEYS = {"name", "variant", "seed", "config", "overrides", "run_dir", "status", "config_label", "axis_label"}


def tiny_spec(store, out_dir: Path, steps: int = 4) -> str:
    """2 variants x 2 seeds of the ~60K-parameter model, `steps` steps each."""
    common = [o for o in tiny_overrides(store, out_dir, **{"train.steps": steps, "train.log_every": 2})
              if not o.startswith(("run.name=", "run.out_dir="))]
    lines = "\n".join("  " + o.replace("=", ": ", 1) for o in common)
    return (f"name: tiny\ngroup: tiny-group\nseeds: [0, 1]\nout_dir: {out_dir}\ndescription: two variants\n"
            f"common:\n{lines}\n"
            "configs:\n  softmax: configs/tiny/softmax.yaml\n  share_kv: configs/tiny/share_kv.yaml\n")


def args_of(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="cmd"))
    return p.parse_args(["sweep", *argv])


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_local_sweep_manifest_only_and_rerun(small_store, tmp_path, write_spec, capsys, monkeypatch):
    spec = write_spec(tiny_spec(small_store, tmp_path / "runs"))
    mpath = tmp_path / "runs" / "tiny" / "sweep.json"
    # Half the sweep: only seed 0.
    assert cmd_sweep(args_of(str(spec), "--local", "--only", "*-s0")) == 0
    doc = read(mpath)
    assert set(doc) == KEYS and all(set(r) == RUN_KEYS for r in doc["runs"])
    assert (doc["name"], doc["group"], doc["baseline"], doc["description"], doc["seeds"], doc["spec"]) == \
        ("tiny", "tiny-group", "softmax", "two variants", [0, 1], str(spec))
    assert {r["name"]: r["status"] for r in doc["runs"]} == {
        "softmax-s0": "finished", "share_kv-s0": "finished", "softmax-s1": "pending", "share_kv-s1": "pending"}
    run = next(r for r in doc["runs"] if r["name"] == "share_kv-s1")
    assert (run["variant"], run["seed"], run["config"], run["run_dir"]) == (
        "share_kv", 1, "configs/tiny/share_kv.yaml", f"{tmp_path}/runs/tiny/share_kv-s1")
    assert run["overrides"][-4:] == ["run.name=share_kv-s1", f"run.out_dir={tmp_path}/runs/tiny", "run.seed=1",
                                     "wandb.group=tiny-group"]
    assert not (tmp_path / "runs/tiny/softmax-s1").exists()
    out = capsys.readouterr().out
    assert "[1/2] softmax-s0" in out and "[2/2 done] share_kv-s0: final eval loss" in out

    # The whole sweep: seed 0 is skipped (already finished), seed 1 trains.
    metrics0 = (tmp_path / "runs/tiny/softmax-s0/metrics.jsonl").read_text()
    assert cmd_sweep(args_of(str(spec), "--local")) == 0
    assert [r["status"] for r in read(mpath)["runs"]] == ["finished"] * 4
    out = capsys.readouterr().out
    assert "softmax-s0 (already finished)" in out and "share_kv-s0 (already finished)" in out
    assert "softmax-s1 (already" not in out and "[4/4 done] share_kv-s1: final eval loss" in out
    assert (tmp_path / "runs/tiny/softmax-s0/metrics.jsonl").read_text() == metrics0

    # Again, with --report: nothing trains; the report is written (here under tmp_path, not the repository).
    import lm.report.cli

    monkeypatch.setattr(lm.report.cli, "RESULTS", tmp_path / "results")
    before = {p: p.read_text() for p in (tmp_path / "runs/tiny").glob("*/metrics.jsonl")}
    assert cmd_sweep(args_of(str(spec), "--local", "--report")) == 0
    out = capsys.readouterr().out
    assert out.count("(already finished)") == 4
    # Two seeds are below the evidence bar: the report is exploratory.
    report = (tmp_path / "results" / "exploratory" / "tiny" / "report.md").read_text()
    assert f"Command: `attnlab sweep {spec} --local --report`" in report and "| share_kv |" in report
    assert (tmp_path / "results" / "exploratory" / "tiny" / "eval_loss_curves.png").is_file()
    assert cmd_sweep(args_of(str(spec), "--local", "--only", "*-s0", "--report")) == 0
    assert "report not written: not every run" in capsys.readouterr().out
    assert {p: p.read_text() for p in before} == before
    assert not list((tmp_path / "runs/tiny").glob(".*.tmp"))  # the manifest's temporary file was renamed


def fake_train(monkeypatch, outcomes: dict[str, str], calls: list):
    """Replace lm.train.train: each run ends with outcomes.get(run name, "finished"); "raise" is a KeyboardInterrupt,
    "sigterm" a SIGTERM to this process."""
    def train(cfg, *, console=None, init_from=None, **kw):
        calls.append((cfg.run.name, init_from))
        status = outcomes.get(cfg.run.name, "finished")
        if status == "raise":
            raise KeyboardInterrupt
        if status == "sigterm":  # outside a run's step loop (setup, compile, between runs)
            os.kill(os.getpid(), signal.SIGTERM)
        run_dir = Path(cfg.run.out_dir) / cfg.run.name
        return RunResult(run_dir, status, 3, {"eval_loss": 1.5} if status == "finished" else None, "it went wrong")

    monkeypatch.setattr(lm.train, "train", train)


@pytest.mark.parametrize("outcome, code, message", [
    ("diverged", 3, "sweep tiny stopped: run share_kv-s0 diverged (it went wrong)"),
    ("interrupted", 0, "sweep tiny stopped: run share_kv-s0 was interrupted at step 3 and saved"),
    ("raise", 0, "sweep tiny stopped: run share_kv-s0 was interrupted; run the same command to continue"),
    ("sigterm", 0, "sweep tiny stopped: run share_kv-s0 was interrupted; run the same command to continue"),
])
def test_a_run_that_does_not_finish_stops_the_sweep(small_store, tmp_path, write_spec, monkeypatch, capsys, outcome,
                                                     code, message):
    spec = write_spec(tiny_spec(small_store, tmp_path / "runs"))
    calls = []
    fake_train(monkeypatch, {"share_kv-s0": outcome}, calls)
    handler = signal.getsignal(signal.SIGTERM)
    assert cmd_sweep(args_of(str(spec), "--local")) == code
    assert [c[0] for c in calls] == ["softmax-s0", "share_kv-s0"]
    assert message in capsys.readouterr().out.replace("\n", " ")
    assert signal.getsignal(signal.SIGTERM) is handler  # the sweep's handler is gone again
    statuses = [r["status"] for r in read(tmp_path / "runs/tiny/sweep.json")["runs"]]
    assert statuses == ["finished", "diverged" if outcome == "diverged" else "interrupted", "pending", "pending"]


def test_init_from_runs_after_its_source_with_its_directory(tmp_path, write_spec, monkeypatch):
    spec = write_spec(f"""\
        name: adapt
        seeds: [0, 1]
        out_dir: {tmp_path}
        common: {{train.steps: 20, optim.warmup_steps: 2}}
        configs:
          cont: {{config: configs/tiny/share_kv.yaml, init_from: base}}
          base: configs/tiny/softmax.yaml
        """)
    calls = []
    fake_train(monkeypatch, {}, calls)
    assert cmd_sweep(args_of(str(spec), "--local", "--only", "*-s1")) == 0
    assert calls == [("base-s1", None), ("cont-s1", f"{tmp_path}/adapt/base-s1")]
    # cont-s0 alone: its source has not finished.
    with pytest.raises(lm.train.RunError, match="run cont-s0 starts from run base-s0 .init_from., which has not "
                                                "finished; include it in --only or run it first"):
        cmd_sweep(args_of(str(spec), "--local", "--only", "cont-s0"))
    assert cmd_sweep(args_of(str(spec), "--local", "--only", "base-s0")) == 0
    assert cmd_sweep(args_of(str(spec), "--local", "--only", "cont-s0")) == 0
    assert calls[-1] == ("cont-s0", f"{tmp_path}/adapt/base-s0")


def test_manifest_statuses_survive_only_while_the_run_is_unchanged(tmp_path, write_spec):
    text = tiny_spec("data/x", tmp_path)
    sw = load_sweep(write_spec(text))
    write_manifest(sw.manifest_path, manifest(sw, {"softmax-s0": "finished", "share_kv-s1": "diverged"}))
    assert previous_statuses(sw) == {"softmax-s0": "finished", "share_kv-s1": "diverged", "share_kv-s0": "pending",
                                     "softmax-s1": "pending"}
    assert "train.steps: 4\n" in text
    changed = load_sweep(write_spec(text.replace("train.steps: 4\n", "train.steps: 6\n"), "b.yaml"))
    assert previous_statuses(changed) == {}


def test_dry_run_lists_commands_and_writes_nothing(tmp_path, write_spec, capsys):
    spec = write_spec(tiny_spec("data/x", tmp_path / "runs"))
    assert cmd_sweep(args_of(str(spec), "--dry-run", "--only", "share_kv-*")) == 0
    out = capsys.readouterr().out
    assert "2 of 4 runs" in out and "share_kv-s1 [pending]: attnlab train configs/tiny/share_kv.yaml --set" in out
    assert "softmax-s0" not in out and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, expect", [
    (["SPEC"], "error: say what to do: --local"),
    (["SPEC", "--local", "--partition", "gpu"], "error: --partition applies to --emit slurm"),
    (["SPEC", "--emit", "slurm", "--zone", "z"], "error: --zone applies to --emit tpu-vm"),
    (["SPEC", "--local", "--out", "x"], "error: --out applies to --emit"),
    (["SPEC", "--dry-run", "--only", "nothing*"], "error: --only nothing*: no run of SPEC matches (runs: softmax-s0"),
    (["MISSING", "--local"], "error: sweep spec MISSING does not exist"),
    (["BAD", "--emit", "slurm"], "error: BAD: seeds: must be a non-empty list"),
])
def test_cli_mistakes_are_one_error_line_with_status_2(tmp_path, write_spec, monkeypatch, capsys, argv, expect):
    """Through lm.cli.main, the `attnlab` entry point."""
    spec = write_spec(tiny_spec("data/x", tmp_path / "runs"))
    bad = write_spec("name: x\nseeds: []\nconfigs: {a: configs/tiny/softmax.yaml}\n", "bad.yaml")
    names = {"SPEC": str(spec), "MISSING": str(tmp_path / "missing.yaml"), "BAD": str(bad)}
    assert lm.cli.main(["sweep", *[names.get(a, a) for a in argv]]) == 2
    err = capsys.readouterr().err
    for k, v in names.items():
        expect = expect.replace(k, v)
    assert err.startswith(expect) and err.count("\n") == 1, err


def _fake_training(monkeypatch, finals: dict[str, float], diverges: str | None = None) -> list:
    """lm.train.train replaced by one that writes each run's config and one final eval (`finals`, else 1.5), or
    diverges for the run named `diverges`; returns the list of (run name, lr) it is called with."""
    calls = []

    def train(cfg, *, console=None, init_from=None, **kw):
        calls.append((cfg.run.name, cfg.optim.lr))
        run_dir = Path(cfg.run.out_dir) / cfg.run.name
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.run.name == diverges:
            return RunResult(run_dir, "diverged", 2, None, "loss 40 > 3x its mean")
        loss = finals.get(cfg.run.name, 1.5)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": cfg.train.steps, "eval_loss": loss}) + "\n")
        return RunResult(run_dir, "finished", cfg.train.steps, {"eval_loss": loss}, "")

    monkeypatch.setattr(lm.train, "train", train)
    return calls


def test_a_tuned_sweep_runs_each_variant_at_its_best_value(small_store, tmp_path, write_spec, monkeypatch, capsys):
    """The grid on seed 0 first; softmax's best lr is 0.002, share_kv's 0.001 (its 0.004 diverges, which does not
    stop the sweep); then seed 1 of each at that lr, seed 0 being the tuning run itself."""
    calls = _fake_training(monkeypatch, {"softmax-lr0.001-s0": 2.0, "softmax-lr0.002-s0": 1.8,
                                         "softmax-lr0.004-s0": 1.9, "share_kv-lr0.001-s0": 2.1,
                                         "share_kv-lr0.002-s0": 2.2}, diverges="share_kv-lr0.004-s0")
    spec = write_spec(tiny_spec(small_store, tmp_path / "runs") + "tune: {key: optim.lr, values: [1.0e-3, 2.0e-3, "
                                                                   "4.0e-3]}\n")
    assert cmd_sweep(args_of(str(spec), "--dry-run")) == 0
    assert "waiting for their tuning runs (optim.lr in [0.001, 0.002, 0.004] on seed 0): the runs of softmax, " \
           "share_kv" in capsys.readouterr().out
    assert cmd_sweep(args_of(str(spec), "--local")) == 0
    out = capsys.readouterr().out
    assert calls == [(f"{v}-lr{x}-s0", float(x)) for v in ("softmax", "share_kv") for x in ("0.001", "0.002", "0.004")] \
        + [("softmax-s1", 0.002), ("share_kv-s1", 0.001)]
    assert "tuning run share_kv-lr0.004-s0 diverged" in out and "softmax-s0 is tuning run softmax-lr0.002-s0" in out
    doc = read(tmp_path / "runs" / "tiny" / "sweep.json")
    assert doc["tune"]["choices"] == {"softmax": 0.002, "share_kv": 0.001}
    status = {r["name"]: r["status"] for r in doc["runs"]}
    assert status["share_kv-lr0.004-s0"] == "diverged" and status["softmax-s0"] == status["share_kv-s1"] == "finished"
    assert not any(r.get("waiting") for r in doc["runs"])
    # Again: nothing new to choose; every finished run returns at once (here: the fake is called again), the
    # diverged tuning run is not trained again.
    calls.clear()
    assert cmd_sweep(args_of(str(spec), "--local")) == 0
    assert [c[0] for c in calls] == [f"{v}-lr{x}-s0" for v, x in (("softmax", "0.001"), ("softmax", "0.002"),
                                                                   ("softmax", "0.004"), ("share_kv", "0.001"),
                                                                   ("share_kv", "0.002"))] + ["softmax-s1", "share_kv-s1"]
    assert "tuning run share_kv-lr0.004-s0 diverged earlier" in capsys.readouterr().out


def test_a_best_value_at_the_edge_of_the_grid_is_tried_past(small_store, tmp_path, write_spec, monkeypatch, capsys):
    """extend: 2 on the grid 0.001, 0.002, 0.004. softmax's best is inside it (0.002): chosen at once. share_kv's
    is the largest (0.004), so it tries 0.008 (better again), then 0.016 (worse): 0.008 is chosen. A report
    would not call it at the edge. Rerun, the same values are found again from the runs on disk."""
    from lm.report.collect import collect
    from lm.report.tables import tuning_cells

    calls = _fake_training(monkeypatch, {
        "softmax-lr0.001-s0": 2.0, "softmax-lr0.002-s0": 1.8, "softmax-lr0.004-s0": 1.9, "share_kv-lr0.001-s0": 2.3,
        "share_kv-lr0.002-s0": 2.2, "share_kv-lr0.004-s0": 2.1, "share_kv-lr0.008-s0": 2.0,
        "share_kv-lr0.016-s0": 2.05})
    spec = write_spec(tiny_spec(small_store, tmp_path / "runs") + "tune: {key: optim.lr, values: [1.0e-3, 2.0e-3, "
                                                                   "4.0e-3], extend: 2}\n")
    assert cmd_sweep(args_of(str(spec), "--local")) == 0
    out = capsys.readouterr().out
    grid = [(f"{v}-lr{x}-s0", float(x)) for v in ("softmax", "share_kv") for x in ("0.001", "0.002", "0.004")]
    # Once the grid has ended: share_kv's next tuning run (tuning runs come first), softmax's other seed, ...
    assert calls == grid + [("share_kv-lr0.008-s0", 0.008), ("softmax-s1", 0.002), ("share_kv-lr0.016-s0", 0.016),
                            ("share_kv-s1", 0.008)]
    assert "best at the edge of what they tried, so tuning goes on with share_kv optim.lr=0.008" in out
    doc = read(tmp_path / "runs" / "tiny" / "sweep.json")
    assert doc["tune"]["choices"] == {"softmax": 0.002, "share_kv": 0.008}
    assert doc["tune"]["extensions"] == {"share_kv": [0.008, 0.016]} and doc["tune"]["extend"] == 2
    by = {r["name"]: r for r in doc["runs"]}
    assert by["share_kv-lr0.016-s0"]["stage"] == "tune" and by["share_kv-lr0.016-s0"]["config_label"] == "share_kv"
    assert by["share_kv-s0"]["reuses"] == "share_kv-lr0.008-s0"
    columns, cells, note = tuning_cells(collect([tmp_path / "runs" / "tiny"]), "eval_loss")
    assert columns[1:] == ["0.001", "0.002", "0.004", "0.008", "0.016"]
    assert cells[0][4:] == ["", ""] and cells[1][4] == "**2.0000** (chosen)" and "At the edge" not in note
    calls.clear()
    assert cmd_sweep(args_of(str(spec), "--local")) == 0
    assert [c[0] for c in calls] == [c[0] for c in grid] + ["share_kv-lr0.008-s0", "share_kv-lr0.016-s0",
                                                            "softmax-s1", "share_kv-s1"]


def test_tuning_runs_a_cluster_finished_are_read_from_their_run_directories(tmp_path, write_spec, small_store):
    """The manifest says nothing (a cluster's jobs do not write it): a tuning run whose metrics have an eval at its
    last step counts as finished, one that stopped early as not ended, so only softmax gets its value."""
    from lm.sweep.tune import choose

    spec = write_spec(tiny_spec(small_store, tmp_path / "runs") + "tune: {key: optim.lr, values: [1.0e-3, 2.0e-3]}\n")
    sw = load_sweep(spec)
    ends = {"softmax-lr0.001-s0": (4, 2.0), "softmax-lr0.002-s0": (4, 1.7), "share_kv-lr0.001-s0": (4, 1.9),
            "share_kv-lr0.002-s0": (2, 1.5)}
    for name, (step, loss) in ends.items():
        run_dir = tmp_path / "runs" / "tiny" / name
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": step, "eval_loss": loss}) + "\n")
    assert choose(sw, {}) == {"softmax": 0.002}
    assert choose(sw, {"share_kv-lr0.002-s0": "diverged"}) == {"softmax": 0.002, "share_kv": 0.001}


def test_eval_variants_score_each_seed_again_and_join_the_report(small_store, tmp_path, write_spec, monkeypatch):
    """After the runs train, each seed's softmax checkpoint is scored through a sink + window cache of 12 keys;
    the report pairs that variant with softmax seed by seed, its loss the cache's, its full loss beside it."""
    import lm.report.cli
    from lm.report.cli import make_report

    spec = write_spec(tiny_spec(small_store, tmp_path / "runs")
                      + "evals: {softmax_sink: {of: softmax, cache_policy: sink-window, cache_budget: 12}}\n")
    assert cmd_sweep(args_of(str(spec), "--local")) == 0
    doc = read(tmp_path / "runs" / "tiny" / "sweep.json")
    for seed in (0, 1):
        rec = read(tmp_path / "runs" / "tiny" / "evals" / f"softmax_sink-s{seed}.json")
        assert rec["source"] == f"softmax-s{seed}" and rec["record"]["cache"]["policy"] == "sink-window"
        assert rec["record"]["cache"]["budget"] == 12
    assert [e["name"] for e in doc["evals"]] == ["softmax_sink-s0", "softmax_sink-s1"]
    before = (tmp_path / "runs" / "tiny" / "evals" / "softmax_sink-s0.json").stat().st_mtime_ns
    assert cmd_sweep(args_of(str(spec), "--local")) == 0  # nothing is scored again
    assert (tmp_path / "runs" / "tiny" / "evals" / "softmax_sink-s0.json").stat().st_mtime_ns == before
    monkeypatch.setattr(lm.report.cli, "RESULTS", tmp_path / "results")
    res = make_report([tmp_path / "runs" / "tiny"], wandb_mode="disabled")
    data = json.loads(res["json"].read_text())
    sink = [r for r in data["runs"] if r["variant"] == "softmax_sink"]
    soft = {r["seed"]: r for r in data["runs"] if r["variant"] == "softmax"}
    assert [r["seed"] for r in sink] == [0, 1] and all(r["eval_of"] == f"softmax-s{r['seed']}" for r in sink)
    for r in sink:
        cache = read(tmp_path / "runs" / "tiny" / "evals" / f"softmax_sink-s{r['seed']}.json")["record"]["cache"]
        assert r["eval_loss"] == cache["loss"] and r["full_eval_loss"] == pytest.approx(soft[r["seed"]]["eval_loss"])
    row = next(v for v in data["variants"] if v["variant"] == "softmax_sink")
    assert row["paired"]["n"] == 2 and row["baseline"] == "softmax"
