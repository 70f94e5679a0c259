"""Launch scripts: every kind parses (`bash -n`), each job's `attnlab train` command is exactly the manifest's run,
SLURM/TPU settings come from the spec and the flags, and the committed paper-scale scripts are what the emitter
writes now."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lm.config import ConfigError
from lm.sweep.emit import KINDS, default_out, emit, render
from lm.sweep.spec import load_sweep
from tests.sweep.conftest import ROOT, parse_train, train_commands

SPEC = """\
name: adapt
seeds: [0, 1]
common: {train.steps: 20, optim.warmup_steps: 2, wandb.tags: [a b, c]}
configs:
  base: configs/tiny/softmax.yaml
  cont: {config: configs/tiny/share_kv.yaml, init_from: base, set: {optim.lr: 1.0e-3}}
cluster:
  slurm: {partition: h100, nodes: 2, gpus_per_node: 4, time: "2:00:00", setup: [source .venv/bin/activate]}
  tpu_vm: {name: my-tpu, zone: us-east5-a, workers: 4, accelerator_type: v5p-32}
"""
JOB = {"slurm": ".sbatch", "tpu-vm": ".sh", "shell": ".sh"}


def bash_n(path: Path) -> None:
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, f"{path}: {res.stderr}"


def check_scripts_match_manifest(out: Path, kind: str) -> dict:
    """bash -n on every script; each job runs exactly its manifest entry's command. Returns the manifest."""
    doc = json.loads((out / "sweep.json").read_text())
    by = {r["name"]: r for r in doc["runs"]}
    for path in sorted(out.iterdir()):
        if path.suffix in (".sh", ".sbatch"):
            bash_n(path)
            text = path.read_text()
            assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    for name, run in by.items():
        text = (out / f"{name}{JOB[kind]}").read_text()
        cmds = train_commands(text)
        assert len(cmds) == 1, (name, cmds)
        got = parse_train(cmds[0])
        assert got["config"] == run["config"] and got["overrides"] == run["overrides"], name
        assert f"run.name={name}" in got["overrides"]
    return doc


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_parses_and_runs_the_manifest_commands(write_spec, tmp_path, kind):
    sw = load_sweep(write_spec(SPEC))
    out, files = emit(sw, kind, tmp_path / kind)
    assert sorted(files) == sorted([f"{r.name}{JOB[kind]}" for r in sw.runs] + ["submit_all.sh", "sweep.json"])
    doc = check_scripts_match_manifest(out, kind)
    assert [r["status"] for r in doc["runs"]] == ["pending"] * 4
    assert doc["runs"][1]["name"] == "cont-s0" and doc["runs"][1]["overrides"][-4:] == [
        "run.name=cont-s0", "run.out_dir=runs/sweeps/adapt", "run.seed=0", "wandb.group=adapt"]
    cont = parse_train(train_commands((out / f"cont-s1{JOB[kind]}").read_text())[0])
    assert cont["init_from"] == "runs/sweeps/adapt/base-s1"
    assert "wandb.tags=[\"a b\", \"c\"]" in cont["overrides"]  # a value with a space survives the shell quoting
    assert render(sw, kind, tmp_path / kind) == files  # deterministic


def test_slurm_directives_dependencies_and_flags(write_spec, tmp_path):
    sw = load_sweep(write_spec(SPEC))
    out, files = emit(sw, "slurm", tmp_path / "s")
    job = files["cont-s0.sbatch"]
    for line in ("#SBATCH --partition=h100", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --time=2:00:00", "#SBATCH --job-name=adapt.cont-s0",
                 "#SBATCH --output=runs/sweeps/adapt/logs/%x-%j.out", "source .venv/bin/activate"):
        assert line in job.splitlines(), line
    directives = [i for i, ln in enumerate(job.splitlines()) if ln.startswith("#SBATCH")]
    first_command = next(i for i, ln in enumerate(job.splitlines()) if ln and not ln.startswith("#"))
    assert max(directives) < first_command  # sbatch reads directives only before the first command
    submit = files["submit_all.sh"].splitlines()
    base = next(ln for ln in submit if ln.endswith("base-s0.sbatch)"))
    cont = next(ln for ln in submit if ln.endswith("cont-s0.sbatch)"))
    var = base.split("=", 1)[0]
    assert f'--dependency=afterok:"${{{var}%%;*}}"' in cont and submit.index(base) < submit.index(cont)
    # Flags override the spec's cluster block.
    _, files = emit(sw, "slurm", tmp_path / "f", flags={"partition": "h200", "time": "1-00:00:00", "nodes": 1})
    assert "#SBATCH --partition=h200" in files["base-s0.sbatch"] and "#SBATCH --nodes=1" in files["base-s0.sbatch"]
    assert "#SBATCH --time=1-00:00:00" in files["base-s0.sbatch"]
    with pytest.raises(ConfigError, match="^--time: '24h' is not a SLURM time limit"):
        emit(sw, "slurm", tmp_path / "g", flags={"time": "24h"})
    with pytest.raises(ConfigError, match="^--zone does not apply to --emit slurm$"):
        render(sw, "slurm", tmp_path / "g", flags={"zone": "x"})


def test_tpu_vm_settings(write_spec, tmp_path):
    sw = load_sweep(write_spec(SPEC))
    _, files = emit(sw, "tpu-vm", tmp_path / "t", flags={"name": "other-tpu"})
    job = files["base-s0.sh"]
    assert "gcloud compute tpus tpu-vm ssh other-tpu --zone=us-east5-a --worker=all" in job
    assert "--command 'cd attnlab && attnlab train configs/tiny/softmax.yaml" in job
    no_tpu = load_sweep(write_spec(SPEC.split("cluster:")[0], "bare.yaml"))
    with pytest.raises(ConfigError, match=r"needs the TPU VM's name: set cluster.tpu_vm.name in .* or pass --tpu-name"):
        render(no_tpu, "tpu-vm", tmp_path / "x")
    _, files = emit(no_tpu, "tpu-vm", tmp_path / "y", flags={"name": "n", "zone": "z"})
    assert "ssh n --zone=z --worker=all" in files["cont-s1.sh"]


def test_shell_scripts_run_from_anywhere_and_stale_scripts_go(write_spec, tmp_path):
    """The shell kind's submit_all.sh, with a stand-in `attnlab` on PATH that records its arguments: it installs
    the manifest and runs every job from the repository root, in order."""
    sw = load_sweep(write_spec(SPEC))
    out = tmp_path / "launch"
    (out).mkdir()
    (out / "old-s9.sh").write_text("#!/usr/bin/env bash\n# Written by `attnlab sweep --emit`; ...\n")
    (out / "mine.sh").write_text("#!/usr/bin/env bash\necho keep\n")
    emit(sw, "shell", out)
    assert not (out / "old-s9.sh").exists() and (out / "mine.sh").exists()
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "calls.txt"
    (fake / "attnlab").write_text(f'#!/usr/bin/env bash\necho "$PWD $*" >> {log}\n')
    (fake / "attnlab").chmod(0o755)
    runs = tmp_path / "runs"
    sw_tmp = load_sweep(write_spec(SPEC.replace("name: adapt", f"name: adapt\nout_dir: {runs}"), "t.yaml"))
    out, _ = emit(sw_tmp, "shell", tmp_path / "launch2")
    env = {"PATH": f"{fake}:{shutil.which('bash').rsplit('/', 1)[0]}:/usr/bin:/bin"}
    res = subprocess.run(["bash", str(out / "submit_all.sh")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    assert [c.split()[0] for c in calls] == [str(ROOT)] * 4
    assert [c.split("run.name=")[1].split()[0] for c in calls] == ["base-s0", "cont-s0", "base-s1", "cont-s1"]
    assert json.loads((runs / "adapt" / "sweep.json").read_text()) == json.loads((out / "sweep.json").read_text())


def test_default_out_is_in_the_sweep_directory(write_spec, tmp_path):
    sw = load_sweep(write_spec(SPEC.replace("name: adapt", f"name: adapt\nout_dir: {tmp_path}/runs")))
    out, _ = emit(sw, "shell")
    assert out == default_out(sw, "shell") == tmp_path / "runs" / "adapt" / "launch" / "shell"
    check_scripts_match_manifest(out, "shell")


@pytest.mark.parametrize("size", ["300m", "1.2b"])
@pytest.mark.parametrize("kind", ["slurm", "tpu-vm"])
def test_committed_paper_scripts_are_what_the_emitter_writes(size, kind):
    """experiments/sweeps/emitted/ holds the paper-scale scripts; they must equal what the committed specs give
    now (after editing a spec, emit again: the spec's header has the command)."""
    sw = load_sweep(f"experiments/sweeps/projection_sharing_{size}.yaml")
    rel = Path(f"experiments/sweeps/emitted/projection_sharing_{size}/{kind}")
    expected = render(sw, kind, rel)
    on_disk = {p.name: p.read_text() for p in (ROOT / rel).iterdir()}
    assert sorted(on_disk) == sorted(expected), f"emit again: files differ in {rel}"
    stale = [name for name in expected if on_disk[name] != expected[name]]
    assert not stale, f"{rel}: {stale[:3]} differ from the emitter's output; emit again (see the spec's header)"
    doc = check_scripts_match_manifest(ROOT / rel, kind)
    assert doc["spec"] == f"experiments/sweeps/projection_sharing_{size}.yaml"
    assert len(doc["runs"]) == len(sw.variants) * len(sw.seeds)
