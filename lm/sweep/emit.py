"""Launch scripts for a sweep: one job script per run, a `submit_all.sh`, and the sweep's manifest.

Kinds:
- `slurm`: `<run>.sbatch`, one node per host of the run (`--ntasks-per-node=1`), `srun attnlab train ...`: with more
  than one node the processes join one jax.distributed run by themselves (SLURM_NTASKS > 1, lm/distributed.py).
  `--signal=TERM@300` lets a run save before its time limit; submitting its script again resumes it.
  submit_all.sh submits every run; a run with init_from waits for its source (`--dependency=afterok`).
- `tpu-vm`: `<run>.sh`, `gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command "cd REPO && attnlab
  train ..."`: every worker of the pod slice starts the same command and they join one run (TPU_WORKER_HOSTNAMES).
  submit_all.sh runs the runs one after another on the one TPU VM.
- `shell`: `<run>.sh`, plain `attnlab train ...` here; submit_all.sh runs them one after another.

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
DEFAULTS = {"slurm": {"nodes": 1, "gpus_per_node": 8, "setup": ()},
            "tpu_vm": {"repo_dir": "attnlab", "setup": ()}}
KILL_GRACE_S = 300  # SLURM sends SIGTERM this long before the time limit: the run saves and exits


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


def _train_line(run: Run, indent: str = "  ") -> str:
    """`attnlab train CONFIG \\` with one `--set KEY=VALUE` per line, every value shell-quoted."""
    args = [shlex.quote(a) for a in run.argv()]
    head, rest = " ".join(args[:3]), args[3:]
    pairs = [f"{rest[i]} {rest[i + 1]}" for i in range(0, len(rest), 2)]
    return " \\\n".join([head] + [indent + p for p in pairs])


def _setup_lines(s: dict) -> list[str]:
    return list(s.get("setup") or ())


def _slurm_job(ctx: _Ctx, run: Run) -> str:
    sweep, s = ctx.sweep, ctx.s
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name={sweep.name}.{run.name}"]
    if s.get("partition"):
        lines.append(f"#SBATCH --partition={s['partition']}")
    if s.get("account"):
        lines.append(f"#SBATCH --account={s['account']}")
    lines += [f"#SBATCH --nodes={s['nodes']}", "#SBATCH --ntasks-per-node=1",
              f"#SBATCH --gpus-per-node={s['gpus_per_node']}"]
    if s.get("time"):
        lines.append(f"#SBATCH --time={s['time']}")
    lines += [f"#SBATCH --output={sweep.sweep_dir}/logs/%x-%j.out", f"#SBATCH --signal=TERM@{KILL_GRACE_S}"]
    lines += _header(ctx, run)
    lines += ["# Submit from the repository root (submit_all.sh does). One `attnlab train` per node; with several",
              "# nodes they join one jax.distributed run (SLURM_NTASKS > 1). SIGTERM before the time limit saves the",
              "# run; submitting this script again resumes it.",
              "set -euo pipefail", 'cd "${SLURM_SUBMIT_DIR:-.}"']
    lines += _setup_lines(s)
    lines.append("srun " + _train_line(run))
    return "\n".join(lines) + "\n"


def _slurm_submit(ctx: _Ctx, runs: list[Run]) -> str:
    sweep, here = ctx.sweep, ctx.here
    lines = ["#!/usr/bin/env bash"] + _header(ctx, None) + [
        "# Submits every job from the repository root. The manifest goes where the runs are, unless one is there.",
        "set -euo pipefail", f'cd "$(dirname "$0")/{ctx.root}"',
        f"mkdir -p {shlex.quote(str(sweep.sweep_dir / 'logs'))}",
        _install_manifest(sweep, here)]
    if any(r.init_from_run for r in runs):
        lines += ["# A run that starts from another run's checkpoint (init_from) waits for that job (afterok). A job",
                  "# stopped at its time limit saves and also ends well: give source runs a time limit they finish in."]
    ids = {}
    for i, r in enumerate(runs):
        dep = ""
        if r.init_from_run in ids:
            dep = f' --dependency=afterok:"${{{ids[r.init_from_run]}%%;*}}"'
        ids[r.name] = f"job{i}"
        lines.append(f"job{i}=$(sbatch --parsable{dep} {shlex.quote(str(here / (r.name + SUFFIX['slurm'])))})")
        lines.append(f'echo "{r.name}: job ${{job{i}%%;*}}"')
    return "\n".join(lines) + "\n"


def _tpu_command(run: Run, s: dict) -> str:
    return " && ".join([f"cd {_remote_path(s['repo_dir'])}", *_setup_lines(s), shlex.join(run.argv())])


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
    lines.append(shlex.join(cmd) + " \\\n  --command " + shlex.quote(_tpu_command(run, s)))
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
        "set -euo pipefail", f'cd "$(dirname "$0")/{ctx.root}"', _train_line(run)]
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
