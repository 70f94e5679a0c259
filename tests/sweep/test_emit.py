"""Launch scripts: every kind parses (`bash -n`), each job's `attnlab train` command is exactly the manifest's run,
SLURM/TPU settings come from the spec and the flags, and the committed paper-scale scripts are what the emitter
writes now."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
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
  slurm: {partition: h100, nodes: 2, gpus_per_node: 4, time: "2:00:00", setup: [source .venv/bin/activate],
          cpus_per_task: 16, mem: 200G, exclusive: true, max_running: 1}
  tpu_vm: {name: my-tpu, zone: us-east5-a, workers: 4, accelerator_type: v5p-32, bucket: gs://bkt/attnlab}
"""
JOB = {"slurm": ".sbatch", "tpu-vm": ".sh", "shell": ".sh"}
PLATFORM = {"slurm": ["run.platform=gpu"], "tpu-vm": ["run.platform=tpu"], "shell": []}  # what the jobs must see
EXTRA = {"slurm": ["array.sbatch"], "tpu-vm": ["setup.sh", "queue.sh"], "shell": []}  # beside the per-run scripts
BUCKET = "gs://bkt/attnlab"  # SPEC's: the pod's jobs keep the runs' directories in the bucket


def on_cluster(kind: str, path: str, bucket: str = BUCKET) -> str:
    return f"{bucket}/{path}" if kind == "tpu-vm" else path


def bash_n(path: Path) -> None:
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, f"{path}: {res.stderr}"


def check_scripts_match_manifest(out: Path, kind: str, bucket: str = BUCKET, store: str | None = None) -> dict:
    """bash -n on every script; each job runs exactly its manifest entry's command (a TPU pod's: with the run
    directory in the bucket and the bucket's copy of `store`, the runs' token store). Returns the manifest."""
    doc = json.loads((out / "sweep.json").read_text())
    by = {r["name"]: r for r in doc["runs"]}
    for path in sorted(out.iterdir()):
        if path.suffix in (".sh", ".sbatch"):
            bash_n(path)
            text = path.read_text()
            # The TPU workers' queue goes on after a failed run: no -e.
            assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text or path.name == "queue.sh"
    for name, run in by.items():
        text = (out / f"{name}{JOB[kind]}").read_text()
        cmds = train_commands(text)
        assert len(cmds) == 1, (name, cmds)
        got = parse_train(cmds[0])
        want = [f"run.out_dir={on_cluster(kind, o.split('=', 1)[1], bucket)}" if o.startswith("run.out_dir=") else o
                for o in run["overrides"]]
        if kind == "tpu-vm" and store:
            want.append(f"data.source={bucket}/stores/{Path(store).name}")
        assert got["config"] == run["config"] and got["overrides"] == want + PLATFORM[kind], name
        assert f"run.name={name}" in got["overrides"]
    return doc


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_parses_and_runs_the_manifest_commands(write_spec, tmp_path, kind):
    sw = load_sweep(write_spec(SPEC))
    out, files = emit(sw, kind, tmp_path / kind)
    assert sorted(files) == sorted([f"{r.name}{JOB[kind]}" for r in sw.runs] + ["submit_all.sh", "sweep.json"]
                                   + EXTRA[kind])
    doc = check_scripts_match_manifest(out, kind)
    assert [r["status"] for r in doc["runs"]] == ["pending"] * 4
    assert doc["runs"][1]["name"] == "cont-s0" and doc["runs"][1]["overrides"][-4:] == [
        "run.name=cont-s0", "run.out_dir=runs/sweeps/adapt", "run.seed=0", "wandb.group=adapt"]
    cont = parse_train(train_commands((out / f"cont-s1{JOB[kind]}").read_text())[0])
    assert cont["init_from"] == on_cluster(kind, "runs/sweeps/adapt/base-s1")
    assert "wandb.tags=[\"a b\", \"c\"]" in cont["overrides"]  # a value with a space survives the shell quoting
    assert render(sw, kind, tmp_path / kind) == files  # deterministic


CONT_S0 = """\
#!/usr/bin/env bash
#SBATCH --job-name=adapt.cont-s0
#SBATCH --partition=h100
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --mem=200G
#SBATCH --exclusive
#SBATCH --time=2:00:00
#SBATCH --output=/dev/null
#SBATCH --export=ALL
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
# Run cont-s0 of sweep adapt (SPEC).
# Written by `attnlab sweep --emit`; edit the spec and run it again rather than editing this file:
#   attnlab sweep SPEC --emit slurm --out OUT
# Submit from the repository root: sbatch THIS_FILE (submit_all.sh submits every run). One `attnlab train`
# per node; with several nodes they join one jax.distributed run (SLURM_NTASKS > 1). Every attempt's output
# is appended to runs/sweeps/adapt/logs/cont-s0.log.
# 300 s before the time limit SLURM sends USR1 here: the run is told to stop (SIGTERM), saves, and
# the job requeues itself to resume from that checkpoint, until the run is finished.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
mkdir -p runs/sweeps/adapt/logs
exec >> runs/sweeps/adapt/logs/cont-s0.log 2>&1
echo "== job ${SLURM_JOB_ID:-none} (attempt $((${SLURM_RESTART_COUNT:-0} + 1))) on $(hostname), $(date '+%F %T') =="
test -f configs/tiny/share_kv.yaml || { echo "error: no configs/tiny/share_kv.yaml here ($PWD): submit from the \
repository root"; exit 2; }
source .venv/bin/activate
echo "W&B settings from the environment: $(compgen -e | grep '^WANDB_' | tr '\\n' ' ' || true)"
stopping=0
trap 'stopping=1; echo "time limit in 300 s: stopping the run to save it"; scancel --signal=TERM "$SLURM_JOB_ID" \
|| true' USR1
srun attnlab train configs/tiny/share_kv.yaml \\
  --set train.steps=20 \\
  --set optim.warmup_steps=2 \\
  --set 'wandb.tags=["a b", "c"]' \\
  --set optim.lr=0.001 \\
  --set run.name=cont-s0 \\
  --set run.out_dir=runs/sweeps/adapt \\
  --set run.seed=0 \\
  --set wandb.group=adapt \\
  --set run.platform=gpu \\
  --init-from runs/sweeps/adapt/base-s0 &
train=$!
# wait returns early when the trap runs; wait again until the run has exited.
while :; do wait "$train" && status=0 || status=$?; kill -0 "$train" 2>/dev/null || break; done
if [ "$stopping" = 1 ] && [ "$status" = 0 ]; then
  echo "saved; requeueing job $SLURM_JOB_ID to go on from the checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
"""


def test_slurm_job_script_is_the_expected_text(write_spec, tmp_path):
    """Directives from the spec (resources, a log the job makes itself, requeue, the warning before the limit), the
    run's command with the platform its jobs must see, and the trap that saves and requeues."""
    spec = write_spec(SPEC)
    sw = load_sweep(spec)
    out, files = emit(sw, "slurm", tmp_path / "s")
    expected = CONT_S0.replace("SPEC", sw.path).replace("OUT", str(tmp_path / "s"))
    assert files["cont-s0.sbatch"] == expected


def test_slurm_array_dependencies_and_flags(write_spec, tmp_path):
    sw = load_sweep(write_spec(SPEC))
    out, files = emit(sw, "slurm", tmp_path / "s")
    here = tmp_path / "s"
    array = files["array.sbatch"].splitlines()
    assert "#SBATCH --job-name=adapt" in array and "runs=(base-s0 base-s1)" in array
    assert array[-1] == f'exec bash {from_root(here)}/"${{runs[$SLURM_ARRAY_TASK_ID]}}.sbatch"'
    submit = files["submit_all.sh"].splitlines()
    assert f"if array=$(sbatch --parsable --array=0-1%1 {from_root(here)}/array.sbatch); then" in submit
    # cont-s1 waits for task 1 of the array (base-s1), and is named if it could not be submitted.
    i = submit.index('src="${array:+${array}_1}"')
    assert submit[i + 1] == (f'if [ -n "$src" ] && job1=$(sbatch --parsable --dependency=afterok:"$src" '
                             f'{from_root(here)}/cont-s1.sbatch); then')
    assert submit[i + 3] == "else job1=; rejected+=(cont-s1); fi"
    # Flags override the spec's cluster block.
    _, files = emit(sw, "slurm", tmp_path / "f", flags={"partition": "h200", "time": "1-00:00:00", "nodes": 1})
    assert "#SBATCH --partition=h200" in files["base-s0.sbatch"] and "#SBATCH --nodes=1" in files["base-s0.sbatch"]
    assert "#SBATCH --time=1-00:00:00" in files["base-s0.sbatch"]
    with pytest.raises(ConfigError, match="^--time: '24h' is not a SLURM time limit"):
        emit(sw, "slurm", tmp_path / "g", flags={"time": "24h"})
    with pytest.raises(ConfigError, match="^--zone does not apply to --emit slurm$"):
        render(sw, "slurm", tmp_path / "g", flags={"zone": "x"})


def from_root(path: Path) -> str:
    """`path` as the scripts name it: relative to the repository root."""
    return os.path.relpath(path, ROOT)


def test_tpu_vm_settings(write_spec, tmp_path):
    sw = load_sweep(write_spec(SPEC))
    _, files = emit(sw, "tpu-vm", tmp_path / "t", flags={"name": "other-tpu"})
    job = files["base-s0.sh"]
    assert "gcloud compute tpus tpu-vm ssh other-tpu --worker=all --zone=us-east5-a" in job
    assert "--command 'cd attnlab && attnlab train configs/tiny/softmax.yaml" in job
    no_tpu = load_sweep(write_spec(SPEC.split("cluster:")[0], "bare.yaml"))
    with pytest.raises(ConfigError, match=r"needs the TPU VM's name: set cluster.tpu_vm.name in .* or pass --tpu-name"):
        render(no_tpu, "tpu-vm", tmp_path / "x")
    # Workers share no disk: without a bucket, only a single-host TPU VM keeps its runs on its own disk.
    with pytest.raises(ConfigError, match=r"^--emit tpu-vm: the several workers of n share no disk, so the runs need a "
                                          r"bucket: set cluster.tpu_vm.bucket"):
        render(no_tpu, "tpu-vm", tmp_path / "y", flags={"name": "n", "zone": "z"})
    one = load_sweep(write_spec(SPEC.split("cluster:")[0] + "cluster: {tpu_vm: {name: n, zone: z, workers: 1}}\n",
                                "one.yaml"))
    files = render(one, "tpu-vm", tmp_path / "z")
    assert "ssh n --worker=all --zone=z" in files["cont-s1.sh"] and "gs://" not in files["cont-s1.sh"]
    with pytest.raises(ConfigError, match=r"cluster.tpu_vm.bucket: 'bkt' is not a Cloud Storage URL"):
        load_sweep(write_spec(SPEC.replace("bucket: gs://bkt/attnlab", "bucket: bkt"), "nobucket.yaml"))


QUEUE_HEAD = """\
set -uo pipefail
cd attnlab
logs=~/attnlab-logs/adapt
mkdir -p "$logs"
failed=()
run() {  # NAME COMMAND...
  local name=$1 status=0; shift
  echo "$(date '+%F %T') $name: starting"
  "$@" >> "$logs/$name.log" 2>&1 || status=$?
  if [ "$status" = 0 ]; then echo "$(date '+%F %T') $name: ended"; else
    echo "$(date '+%F %T') $name: failed with exit status $status (its log: $logs/$name.log)"; failed+=("$name"); fi
  gcloud storage cp "$logs/$name.log" gs://bkt/attnlab/runs/sweeps/adapt/logs/"$name.$(hostname).log" >/dev/null \
2>&1 || echo "could not copy $name's log to the bucket"
}
run base-s0 attnlab train configs/tiny/softmax.yaml \\
  --set train.steps=20 \\
  --set optim.warmup_steps=2 \\
  --set 'wandb.tags=["a b", "c"]' \\
  --set run.name=base-s0 \\
  --set run.out_dir=gs://bkt/attnlab/runs/sweeps/adapt \\
  --set run.seed=0 \\
  --set wandb.group=adapt \\
  --set run.platform=tpu
"""


def test_tpu_vm_queue_is_the_expected_text_and_goes_on_past_a_failed_run(write_spec, tmp_path):
    """queue.sh (what every worker runs, detached) against expected text; then run here with stand-ins for attnlab
    (cont-s0 fails) and gcloud: every run is tried in order, the failed one is named, each log is copied up."""
    sw = load_sweep(write_spec(SPEC))
    out, files = emit(sw, "tpu-vm", tmp_path / "t")
    assert QUEUE_HEAD in files["queue.sh"]
    repo = tmp_path / "repo"
    repo.mkdir()
    (out / "queue.sh").write_text(files["queue.sh"].replace("cd attnlab", f"cd {repo}"))
    calls = tmp_path / "calls.txt"
    env = _stand_ins(tmp_path / "bin", attnlab=f'echo "$*" >> {calls}\ncase "$*" in *run.name=cont-s0*) exit 3;; esac\n',
                     gcloud=f'echo "gcloud $*" >> {calls}\n')
    env["HOME"] = str(tmp_path)
    res = subprocess.run(["bash", str(out / "queue.sh")], env=env, capture_output=True, text=True)
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stdout.splitlines()[-1] == "queue ended: 1 of 4 runs failed: cont-s0"
    assert "cont-s0: failed with exit status 3 (its log: " in res.stdout
    trained = [ln.split("run.name=")[1].split()[0] for ln in calls.read_text().splitlines() if "run.name=" in ln]
    assert trained == ["base-s0", "cont-s0", "base-s1", "cont-s1"]
    copied = [ln for ln in calls.read_text().splitlines() if ln.startswith("gcloud storage cp")]
    assert len(copied) == 4 and copied[1].endswith(f"gs://bkt/attnlab/runs/sweeps/adapt/logs/cont-s0.{socket.gethostname()}.log")


def test_tpu_vm_setup_and_submit_with_stand_ins(write_spec, tmp_path, small_store):
    """setup.sh copies the runs' store to the bucket (meta.json last) and the committed code to every worker, where
    it installs for the TPU; submit_all.sh refuses while the store is not in the bucket, then starts the queue on
    every worker under nohup."""
    spec = SPEC.replace("common: {", f"common: {{data.source: {small_store}, ")
    sw = load_sweep(write_spec(spec))
    out, _ = emit(sw, "tpu-vm", tmp_path / "t")
    calls, there = tmp_path / "calls.txt", tmp_path / "in-bucket"
    env = _stand_ins(tmp_path / "bin", gcloud=f'echo "$*" >> {calls}\n'
                     f'case "$*" in "storage ls"*) test -e {there};; *) true;; esac\n')
    res = subprocess.run(["bash", str(out / "submit_all.sh")], env=env, capture_output=True, text=True)
    url = f"gs://bkt/attnlab/stores/{small_store.name}"
    assert res.returncode == 2 and res.stderr.splitlines() == [
        f"error: token store {url} (data.source of 4 run(s)) is not there: run setup.sh first", "nothing submitted"]
    res = subprocess.run(["bash", str(out / "setup.sh")], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    setup = calls.read_text().splitlines()[1:]
    assert setup[1] == f"storage rsync -r -x meta\\.json$ {small_store} {url}"
    assert setup[2] == f"storage cp {small_store}/meta.json {url}/meta.json"
    assert setup[3].startswith("compute tpus tpu-vm scp ") and setup[3].endswith(
        "attnlab-src.tar.gz my-tpu:attnlab-src.tar.gz --worker=all --zone=us-east5-a")
    assert setup[4].endswith("--command mkdir -p attnlab && tar -xzf attnlab-src.tar.gz -C attnlab && cd attnlab && "
                             "make install DEVICE=tpu && .venv/bin/python -m lm.devices tpu")
    there.touch()
    calls.unlink()
    res = subprocess.run(["bash", str(out / "submit_all.sh")], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    submit = calls.read_text().splitlines()
    assert submit[-2] == "compute tpus tpu-vm scp queue.sh my-tpu:attnlab-queue-adapt.sh --worker=all --zone=us-east5-a"
    assert submit[-1].endswith("--command nohup bash attnlab-queue-adapt.sh > attnlab-queue-adapt.log 2>&1 < "
                               "/dev/null &")


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
    doc = check_scripts_match_manifest(ROOT / rel, kind, sw.cluster["tpu_vm"]["bucket"], "data/slimpajama-gpt2")
    assert doc["spec"] == f"experiments/sweeps/projection_sharing_{size}.yaml"
    assert len(doc["runs"]) == len(sw.variants) * len(sw.seeds)


def _stand_ins(bin_dir: Path, **scripts: str) -> dict:
    """Executables named by the keywords (e.g. sbatch=...) in `bin_dir`, first on PATH, with the venv's python."""
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin"}


CPU_SPEC = SPEC.replace("gpus_per_node: 4", "gpus_per_node: 0").replace("setup: [source .venv/bin/activate],", "")


def test_slurm_submit_goes_on_past_a_rejected_job_and_names_it(write_spec, tmp_path):
    """A stand-in sbatch rejects cont-s0: the array and cont-s1 are still submitted, cont-s0 is named, exit 1."""
    sw = load_sweep(write_spec(CPU_SPEC.replace("name: adapt", f"name: adapt\nout_dir: {tmp_path / 'runs'}")))
    out, _ = emit(sw, "slurm", tmp_path / "s")
    calls = tmp_path / "calls.txt"
    env = _stand_ins(tmp_path / "bin", sbatch=f'echo "$*" >> {calls}\n'
                     'case "$*" in *cont-s0*) echo "sbatch: error: invalid partition" >&2; exit 1;; esac\n'
                     'echo "$((100 + $(wc -l < ' + str(calls) + ')));cluster"\n')
    res = subprocess.run(["bash", str(out / "submit_all.sh")], env=env, capture_output=True, text=True)
    assert res.returncode == 1, res.stderr
    submitted = calls.read_text().splitlines()
    assert submitted[0].startswith("--parsable --array=0-1%1 ") and submitted[0].endswith("array.sbatch")
    assert submitted[2] == f"--parsable --dependency=afterok:101_1 {from_root(out)}/cont-s1.sbatch"
    assert "array job 101, task i runs the i-th of: base-s0 base-s1" in res.stdout
    assert "cont-s1: job 103, after base-s1" in res.stdout
    assert res.stderr.strip().splitlines()[-1].startswith("error: not submitted: cont-s0 (SLURM's message is above")


def test_slurm_submit_checks_the_store_and_the_plugin_before_submitting(write_spec, tmp_path):
    missing = tmp_path / "no-such-store"
    spec = SPEC.replace("common: {", f"common: {{data.source: {missing}, ").replace(
        "setup: [source .venv/bin/activate],", "")
    sw = load_sweep(write_spec(spec))
    out, _ = emit(sw, "slurm", tmp_path / "s")
    calls = tmp_path / "calls.txt"
    env = _stand_ins(tmp_path / "bin", sbatch=f'echo "$*" >> {calls}\necho 1\n')
    res = subprocess.run(["bash", str(out / "submit_all.sh")], env=env, capture_output=True, text=True)
    assert res.returncode == 2 and not calls.exists()
    assert res.stderr.splitlines() == [
        f"error: token store {missing} (data.source of 4 run(s)) does not exist: prepare it first (attnlab data "
        f"prepare --source FILES --tokenizer TOKENIZER --out {missing})",
        "error: jax's gpu plugin (jax-cuda12-plugin) is not installed here: `make install DEVICE=cuda12` (or pip "
        "install 'attnlab[cuda12]'); the jobs would train on the CPU",
        "nothing submitted"]


@pytest.mark.parametrize("warned", [True, False])
def test_slurm_job_saves_and_requeues_on_the_time_limit_warning(write_spec, tmp_path, warned):
    """The job script with stand-ins for srun, scancel and scontrol: USR1 (SLURM's warning) makes it tell the run
    to stop (the run saves and exits 0) and requeue the job; a run that ends by itself is not requeued and its
    exit status is the job's."""
    sw = load_sweep(write_spec(CPU_SPEC.replace("name: adapt", f"name: adapt\nout_dir: {tmp_path / 'runs'}")))
    out, _ = emit(sw, "slurm", tmp_path / "s")
    pid, calls = tmp_path / "train.pid", tmp_path / "scontrol.txt"
    env = _stand_ins(
        tmp_path / "bin", srun='exec "$@"\n', scancel=f'kill -TERM "$(cat {pid})"\n',
        scontrol=f'echo "$*" >> {calls}\n',
        attnlab=f"trap 'echo \"received SIGTERM: saved\"; exit 0' TERM\necho $$ > {pid}\necho training\n"
                f"for i in $(seq 100); do sleep 0.1; done\nexit 3\n")
    env.update(SLURM_JOB_ID="42", SLURM_SUBMIT_DIR=str(ROOT))
    job = subprocess.Popen(["bash", str(out / "base-s0.sbatch")], env=env)
    t0 = time.monotonic()
    while not pid.exists() and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    if warned:
        job.send_signal(signal.SIGUSR1)
    assert job.wait(timeout=60) == (0 if warned else 3)
    log = (tmp_path / "runs" / "adapt" / "logs" / "base-s0.log").read_text().splitlines()
    assert log[0].startswith("== job 42 (attempt 1) on ")
    if warned:
        assert log[-3:] == ["time limit in 300 s: stopping the run to save it", "received SIGTERM: saved",
                            "saved; requeueing job 42 to go on from the checkpoint"]
        assert calls.read_text() == "requeue 42\n"
    else:
        assert log[-1] == "training" and not calls.exists()
