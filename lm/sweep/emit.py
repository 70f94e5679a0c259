"""Launch scripts for a sweep: one job script per run, a `submit_all.sh`, and the sweep's manifest.

Kinds:
- `slurm`: `<run>.sbatch`, one node per host of the run (`--ntasks-per-node=1`), `srun attnlab train ...`: with more
  than one node the processes join one jax.distributed run by themselves (SLURM_NTASKS > 1, lm/distributed.py).
  Each job appends its output to `<sweep dir>/logs/<run>.log` (the script makes the directory: SLURM's own
  --output fails a job whose directory is missing), every attempt under a header line. `--signal=B:USR1@grace`
  warns the script before the time limit: it tells the run to stop (SIGTERM: save and exit 0) and requeues the
  job (`--requeue`), which resumes from that checkpoint, until the run is finished. submit_all.sh checks the token
  stores and the environment's jax plugin first, submits the runs as one array job (`%max_running` at a time),
  and each run with init_from as its own job after its source (`afterok`); a rejected job is named and the rest
  still go in.
- `tpu-vm`: `<run>.sh`, `gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command "cd REPO && attnlab
  train ..."`: every worker of the pod slice starts the same command and they join one run (TPU_WORKER_HOSTNAMES).
  submit_all.sh runs the runs one after another on the one TPU VM.
- `shell`: `<run>.sh`, plain `attnlab train ...` here; submit_all.sh runs them one after another.

Cluster jobs set `run.platform` (gpu, or cpu for a SLURM partition without GPUs; tpu), so a job whose environment
lacks jax's accelerator plugin refuses to start instead of training on the CPU.

Scripts are deterministic (no dates, no absolute paths unless the spec has them) so they can be committed and
diffed; paths in them are relative to the repository root, which is the directory `attnlab sweep` runs in.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path
from typing import Any

from lm.config import ConfigError
from lm.sweep.local import manifest, manifest_text
from lm.sweep.spec import CLUSTER_KEYS, Run, Sweep, check_cluster_value

KINDS = ("slurm", "tpu-vm", "shell")
SUFFIX = {"slurm": ".sbatch", "tpu-vm": ".sh", "shell": ".sh"}
MARK = "Written by `attnlab sweep --emit"  # in every script we write; only such files are ever removed
# grace: seconds before the time limit SLURM warns the job script, long enough for a step and a save.
DEFAULTS = {"slurm": {"nodes": 1, "gpus_per_node": 8, "grace": 300, "setup": ()},
            "tpu_vm": {"repo_dir": "attnlab", "setup": ()}}
PLATFORM = {"tpu-vm": "tpu"}  # slurm: gpu, or cpu on a partition without GPUs; shell: whatever jax finds


def default_out(sweep: Sweep, kind: str) -> Path:
    return sweep.sweep_dir / "launch" / kind


def settings(sweep: Sweep, kind: str, flags: dict[str, Any] | None = None) -> dict[str, Any]:
    """The cluster settings of `kind`: defaults, then the spec's cluster block, then the flags given."""
    block = "tpu_vm" if kind == "tpu-vm" else kind
    out = {**DEFAULTS.get(block, {}), **sweep.cluster.get(block, {})}
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key not in CLUSTER_KEYS.get(block, {}):
            raise ConfigError(f"--{_flag(key)} does not apply to --emit {kind}")

        def fail(msg, key=key):
            raise ConfigError(f"--{_flag(key)}: {msg}")

        out[key] = check_cluster_value(block, key, value, fail)
    if kind == "tpu-vm":
        for key in ("name", "zone"):
            if not out.get(key):
                raise ConfigError(f"--emit tpu-vm needs the TPU VM's {key}: set cluster.tpu_vm.{key} in {sweep.path} "
                                  f"or pass --{_flag('tpu_name' if key == 'name' else key)}")
    return out


def _flag(key: str) -> str:
    return {"name": "tpu-name"}.get(key, key.replace("_", "-"))


@dataclasses.dataclass(frozen=True)
class _Ctx:
    """What every script of one emit shares."""

    sweep: Sweep
    kind: str
    s: dict[str, Any]  # the cluster settings
    out_dir: Path  # where the scripts go
    root: str  # from out_dir back to the repository root (where the emitter runs), for `cd`
    command: str  # the `attnlab sweep` command that writes these files again

    @property
    def here(self) -> Path:
        """The scripts' directory as seen from the repository root."""
        return Path(os.path.relpath(self.out_dir.resolve(), Path.cwd().resolve())) if self.out_dir.is_absolute() \
            else self.out_dir


def render(sweep: Sweep, kind: str, out_dir: str | Path, runs: list[Run] | None = None,
           flags: dict[str, Any] | None = None, only: list[str] | None = None) -> dict[str, str]:
    """The files of `kind` for the runs (default: all; `only`: the --only patterns that chose them), as written
    to `out_dir`: file name -> text."""
    if kind not in KINDS:
        raise ConfigError(f"--emit {kind}: unknown kind (valid: {', '.join(KINDS)})")
    s = settings(sweep, kind, flags)
    runs = list(sweep.runs) if runs is None else runs
    out_dir = Path(out_dir)
    argv = ["attnlab", "sweep", sweep.path, "--emit", kind]
    if out_dir != default_out(sweep, kind):
        argv += ["--out", str(out_dir)]
    for key, value in (flags or {}).items():
        argv += [f"--{_flag(key)}", str(value)] if value is not None else []
    for pattern in only or ():
        argv += ["--only", pattern]
    ctx = _Ctx(sweep, kind, s, out_dir, os.path.relpath(Path.cwd().resolve(), out_dir.resolve()), shlex.join(argv))
    files = {f"{r.name}{SUFFIX[kind]}": _JOB[kind](ctx, r) for r in runs}
    if kind == "slurm" and any(r.init_from_run is None for r in runs):
        files["array.sbatch"] = _slurm_array(ctx, [r for r in runs if r.init_from_run is None])
    files["submit_all.sh"] = _SUBMIT[kind](ctx, runs)
    files["sweep.json"] = manifest_text(manifest(sweep))
    return files


def emit(sweep: Sweep, kind: str, out_dir: str | Path | None = None, runs: list[Run] | None = None,
         flags: dict[str, Any] | None = None, only: list[str] | None = None) -> tuple[Path, dict[str, str]]:
    """Write the launch files to `out_dir` (default `<out_dir>/<name>/launch/<kind>/`); scripts an earlier emit
    wrote there for runs the sweep no longer has are removed. Returns (directory, files written)."""
    out = Path(out_dir) if out_dir is not None else default_out(sweep, kind)
    files = render(sweep, kind, out, runs, flags, only)
    out.mkdir(parents=True, exist_ok=True)
    for old in sorted(out.glob(f"*{SUFFIX[kind]}")):
        if old.name not in files and old.is_file() and MARK in old.read_text(errors="replace")[:2000]:
            old.unlink()
    for name, text in files.items():
        path = out / name
        path.write_text(text)
        if name.endswith((".sh", ".sbatch")):
            path.chmod(0o755)
    return out, files


def _header(ctx: _Ctx, run: Run | None) -> list[str]:
    sweep = ctx.sweep
    what = f"Run {run.name} of sweep {sweep.name}" if run else f"Every run of sweep {sweep.name}"
    return [f"# {what} ({sweep.path}).", f"# {MARK}`; edit the spec and run it again rather than editing this file:",
            f"#   {ctx.command}"]


def platform(ctx: _Ctx) -> str | None:
    """The run.platform a job of this kind sets (None: the shell kind leaves it to the config)."""
    if ctx.kind == "slurm":
        return "gpu" if ctx.s["gpus_per_node"] else "cpu"
    return PLATFORM.get(ctx.kind)


def train_argv(ctx: _Ctx, run: Run) -> list[str]:
    """The run's `attnlab train` command, with the platform the cluster's jobs must see."""
    argv, where = run.argv(), platform(ctx)
    cut = len(argv) - (2 if run.init_from else 0)  # before --init-from, after the run's own --set pairs
    return argv[:cut] + (["--set", f"run.platform={where}"] if where else []) + argv[cut:]


def _train_line(argv: list[str], indent: str = "  ") -> str:
    """`attnlab train CONFIG \\` with one `--set KEY=VALUE` per line, every value shell-quoted."""
    args = [shlex.quote(a) for a in argv]
    head, rest = " ".join(args[:3]), args[3:]
    pairs, i = [], 0
    while i < len(rest):
        pairs.append(" ".join(rest[i:i + 2]))
        i += 2
    return " \\\n".join([head] + [indent + p for p in pairs])


def _setup_lines(s: dict) -> list[str]:
    return list(s.get("setup") or ())


def _stores(runs: list[Run]) -> dict[str, int]:
    """The token stores (data.source paths) the runs read -> how many runs read each."""
    out: dict[str, int] = {}
    for r in runs:
        source = r.cfg.data.source if r.cfg is not None else "stdlib"
        if source != "stdlib" and not source.startswith("synthetic:"):
            out[source] = out.get(source, 0) + 1
    return out


def _preflight(ctx: _Ctx, runs: list[Run]) -> list[str]:
    """Shell lines that count problems in `problems` before anything is submitted: a token store missing here,
    an environment without jax's plugin for the jobs' platform."""
    lines = ["problems=0"]
    for store, n in _stores(runs).items():
        q = shlex.quote(store)
        lines.append(f"test -f {q}/meta.json || {{ echo \"error: token store {store} (data.source of {n} run(s)) "
                     f"does not exist: prepare it first (attnlab data prepare --source FILES --tokenizer TOKENIZER "
                     f"--out {store})\" >&2; problems=1; }}")
    where = platform(ctx)
    if where:
        check = " && ".join([*_setup_lines(ctx.s), f"python -m lm.devices {where}"])
        lines.append(f"( {check} ) || problems=1")
    return lines + ['[ "$problems" = 0 ] || { echo "nothing submitted" >&2; exit 2; }']


def _slurm_directives(ctx: _Ctx, job_name: str) -> list[str]:
    s = ctx.s
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name={job_name}"]
    for key in ("partition", "account"):
        if s.get(key):
            lines.append(f"#SBATCH --{key}={s[key]}")
    lines += [f"#SBATCH --nodes={s['nodes']}", "#SBATCH --ntasks-per-node=1"]
    if s["gpus_per_node"]:
        lines.append(f"#SBATCH --gpus-per-node={s['gpus_per_node']}")
    if s.get("cpus_per_task"):
        lines.append(f"#SBATCH --cpus-per-task={s['cpus_per_task']}")
    if s.get("mem"):
        lines.append(f"#SBATCH --mem={s['mem']}")
    if s.get("exclusive"):
        lines.append("#SBATCH --exclusive")
    if s.get("time"):
        lines.append(f"#SBATCH --time={s['time']}")
    # The job writes its own log (see _slurm_job); WANDB_* and the rest of the submitting shell's environment go in.
    return lines + ["#SBATCH --output=/dev/null", "#SBATCH --export=ALL", "#SBATCH --requeue",
                    f"#SBATCH --signal=B:USR1@{s['grace']}"]


def _slurm_log(ctx: _Ctx, run: Run) -> str:
    return str(ctx.sweep.sweep_dir / "logs" / f"{run.name}.log")


def _slurm_job(ctx: _Ctx, run: Run) -> str:
    s, log = ctx.s, _slurm_log(ctx, run)
    lines = _slurm_directives(ctx, f"{ctx.sweep.name}.{run.name}") + _header(ctx, run)
    lines += [
        "# Submit from the repository root: sbatch THIS_FILE (submit_all.sh submits every run). One `attnlab train`",
        "# per node; with several nodes they join one jax.distributed run (SLURM_NTASKS > 1). Every attempt's output",
        f"# is appended to {log}.",
        f"# {s['grace']} s before the time limit SLURM sends USR1 here: the run is told to stop (SIGTERM), saves, and",
        "# the job requeues itself to resume from that checkpoint, until the run is finished.",
        "set -euo pipefail",
        'cd "${SLURM_SUBMIT_DIR:-.}"',
        f"mkdir -p {shlex.quote(str(Path(log).parent))}",
        f"exec >> {shlex.quote(log)} 2>&1",
        'echo "== job ${SLURM_JOB_ID:-none} (attempt $((${SLURM_RESTART_COUNT:-0} + 1))) on $(hostname), '
        '$(date \'+%F %T\') =="',
        f"test -f {shlex.quote(run.config)} || {{ echo \"error: no {run.config} here ($PWD): submit from the "
        f"repository root\"; exit 2; }}",
        *_setup_lines(s),
        'echo "W&B settings from the environment: $(compgen -e | grep \'^WANDB_\' | tr \'\\n\' \' \' || true)"',
        "stopping=0",
        "trap 'stopping=1; echo \"time limit in " + str(s["grace"]) + " s: stopping the run to save it\"; "
        "scancel --signal=TERM \"$SLURM_JOB_ID\" || true' USR1",
        "srun " + _train_line(train_argv(ctx, run)) + " &",
        "train=$!",
        "# wait returns early when the trap runs; wait again until the run has exited.",
        'while :; do wait "$train" && status=0 || status=$?; kill -0 "$train" 2>/dev/null || break; done',
        'if [ "$stopping" = 1 ] && [ "$status" = 0 ]; then',
        '  echo "saved; requeueing job $SLURM_JOB_ID to go on from the checkpoint"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def _slurm_array(ctx: _Ctx, runs: list[Run]) -> str:
    """One array job over `runs`: task i runs the i-th run's job script (its #SBATCH lines are this file's)."""
    names = " ".join(shlex.quote(r.name) for r in runs)
    lines = _slurm_directives(ctx, ctx.sweep.name) + _header(ctx, None) + [
        "# The runs without init_from as one array job (submit_all.sh submits it with --array=0-N%max_running):",
        "# task i runs the i-th run's job script here, with its own log, requeues and job id.",
        "set -euo pipefail",
        'cd "${SLURM_SUBMIT_DIR:-.}"',
        f"runs=({names})",
        f'exec bash {shlex.quote(str(ctx.here))}/"${{runs[$SLURM_ARRAY_TASK_ID]}}{SUFFIX["slurm"]}"',
    ]
    return "\n".join(lines) + "\n"


def _slurm_submit(ctx: _Ctx, runs: list[Run]) -> str:
    sweep, here, s = ctx.sweep, ctx.here, ctx.s
    first = [r for r in runs if r.init_from_run is None]
    limit = f"%{s['max_running']}" if s.get("max_running") else ""
    lines = ["#!/usr/bin/env bash"] + _header(ctx, None) + [
        "# Submits the sweep from the repository root, after checking that every token store exists and that the",
        "# environment has jax's plugin for the jobs. The runs go in as one array job"
        + (f", at most {s['max_running']} running at once;" if limit else ";"),
        "# a run that starts from another run's checkpoint (init_from) as its own job after that run (afterok). A",
        "# job SLURM rejects is named, and the others are still submitted.",
        "set -euo pipefail", f'cd "$(dirname "$0")/{ctx.root}"', *_preflight(ctx, runs),
        _install_manifest(sweep, here), "rejected=()", "array="]
    # The shell expression of each run's job id; empty when its job was not submitted.
    ids = {r.name: f"${{array:+${{array}}_{i}}}" for i, r in enumerate(first)}
    if first:
        names = " ".join(r.name for r in first)
        lines += [f"if array=$(sbatch --parsable --array=0-{len(first) - 1}{limit} "
                  f"{shlex.quote(str(here / 'array.sbatch'))}); then",
                  f'  array=${{array%%;*}}; echo "array job $array, task i runs the i-th of: {names}"',
                  f"else array=; rejected+=({names}); fi"]
    for i, r in enumerate(r for r in runs if r.init_from_run is not None):
        script = shlex.quote(str(here / (r.name + SUFFIX["slurm"])))
        if r.init_from_run in ids:  # else its source is not part of this submission (--only): it has finished
            lines += [f'src="{ids[r.init_from_run]}"',
                      f'if [ -n "$src" ] && job{i}=$(sbatch --parsable --dependency=afterok:"$src" {script}); then']
        else:
            lines.append(f"if job{i}=$(sbatch --parsable {script}); then")
        lines += [f'  job{i}=${{job{i}%%;*}}; echo "{r.name}: job $job{i}, after {r.init_from_run}"',
                  f"else job{i}=; rejected+=({r.name}); fi"]
        ids[r.name] = f"$job{i}"
    lines += ['if [ "${#rejected[@]}" -gt 0 ]; then',
              "  echo \"error: not submitted: ${rejected[*]} (SLURM's message is above, or the run they start from was "
              f"not submitted); submit each with sbatch {here}/RUN.sbatch once fixed\" >&2",
              "  exit 1", "fi"]
    return "\n".join(lines) + "\n"


def _tpu_command(ctx: _Ctx, run: Run) -> str:
    s = ctx.s
    return " && ".join([f"cd {_remote_path(s['repo_dir'])}", *_setup_lines(s), shlex.join(train_argv(ctx, run))])


def _remote_path(path: str) -> str:
    """`path` quoted for the workers' shell, a leading ~/ left to it to expand."""
    return "~/" + shlex.quote(path[2:]) if path.startswith("~/") else shlex.quote(path)


def _gcloud_ssh(s: dict, worker: str) -> list[str]:
    args = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", s["name"], f"--zone={s['zone']}"]
    if s.get("project"):
        args.append(f"--project={s['project']}")
    return args + [f"--worker={worker}"]


def _tpu_about(s: dict) -> list[str]:
    shape = ", ".join(x for x in (s.get("accelerator_type"), f"{s['workers']} workers" if s.get("workers") else None)
                      if x)
    repo = s["repo_dir"] if s["repo_dir"].startswith(("/", "~")) else f"~/{s['repo_dir']}"
    return [f"# TPU VM {s['name']} in {s['zone']}{f' ({shape})' if shape else ''}, the repository at {repo} on every",
            "# worker. Every worker runs the same command and they join one run (TPU_WORKER_HOSTNAMES); the run",
            "# directory must be on a filesystem all workers share (edit out_dir in the spec). A run stopped early",
            "# saved a checkpoint: running this script again resumes it."]


def _tpu_job(ctx: _Ctx, run: Run) -> str:
    s = ctx.s
    cmd = _gcloud_ssh(s, "all")
    lines = ["#!/usr/bin/env bash"] + _header(ctx, run) + _tpu_about(s) + ["set -euo pipefail"]
    lines.append(shlex.join(cmd) + " \\\n  --command " + shlex.quote(_tpu_command(ctx, run)))
    return "\n".join(lines) + "\n"


def _tpu_submit(ctx: _Ctx, runs: list[Run]) -> str:
    sweep, s = ctx.sweep, ctx.s
    remote = f"{s['repo_dir'].rstrip('/')}/{sweep.sweep_dir}"
    check = shlex.join(_gcloud_ssh(s, "0")) + " --command " + shlex.quote(
        f"mkdir -p {_remote_path(remote)} && test -e {_remote_path(remote + '/sweep.json')}")
    scp = ["gcloud", "compute", "tpus", "tpu-vm", "scp", "sweep.json", f"{s['name']}:{remote}/sweep.json",
           f"--zone={s['zone']}"] + ([f"--project={s['project']}"] if s.get("project") else []) + ["--worker=0"]
    lines = ["#!/usr/bin/env bash"] + _header(ctx, None) + [
        "# Runs every run, one after another, on the TPU VM (run from anywhere; the commands run on the workers).",
        "# The manifest goes where the runs are, unless one is there already.",
        "set -euo pipefail", 'cd "$(dirname "$0")"', f"{check} || {shlex.join(scp)}"]
    lines += [f"bash {shlex.quote(r.name + SUFFIX['tpu-vm'])}" for r in runs]
    return "\n".join(lines) + "\n"


def _shell_job(ctx: _Ctx, run: Run) -> str:
    lines = ["#!/usr/bin/env bash"] + _header(ctx, run) + [
        "# Trains the run here; a run stopped early saved a checkpoint: running this script again resumes it.",
        "set -euo pipefail", f'cd "$(dirname "$0")/{ctx.root}"', _train_line(run.argv())]
    return "\n".join(lines) + "\n"


def _shell_submit(ctx: _Ctx, runs: list[Run]) -> str:
    sweep, here = ctx.sweep, ctx.here
    lines = ["#!/usr/bin/env bash"] + _header(ctx, None) + [
        "# Trains every run here, one after another (finished runs return at once, a stopped one resumes).",
        "set -euo pipefail", f'cd "$(dirname "$0")/{ctx.root}"', _install_manifest(sweep, here)]
    lines += [f"bash {shlex.quote(str(here / (r.name + SUFFIX['shell'])))}" for r in runs]
    return "\n".join(lines) + "\n"


def _install_manifest(sweep: Sweep, here: Path) -> str:
    dst = shlex.quote(str(sweep.manifest_path))
    src = shlex.quote(str(here / "sweep.json"))
    return f"mkdir -p {shlex.quote(str(sweep.sweep_dir))} && {{ test -e {dst} || cp {src} {dst}; }}"


_JOB = {"slurm": _slurm_job, "tpu-vm": _tpu_job, "shell": _shell_job}
_SUBMIT = {"slurm": _slurm_submit, "tpu-vm": _tpu_submit, "shell": _shell_submit}

__all__ = ["KINDS", "emit", "render", "settings", "default_out"]
