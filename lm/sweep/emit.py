"""Launch scripts for a sweep (`attnlab sweep SPEC --emit KIND`): the kind's scripts, one per run and a
`submit_all.sh`, and the sweep's manifest.

Kinds: `slurm` (lm/sweep/slurm.py), `tpu-vm` (lm/sweep/tpu_vm.py), and `shell`: `<run>.sh`, plain `attnlab train ...`
here, and a submit_all.sh that runs them one after another.

Cluster jobs set `run.platform` (gpu, or cpu for a SLURM partition without GPUs; tpu), so a job whose environment
lacks jax's accelerator plugin refuses to start instead of training on the CPU.

Scripts are deterministic (no dates, no absolute paths unless the spec has them) so they can be committed and
diffed; paths in them are relative to the repository root, which is the directory `attnlab sweep` runs in.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from lm.config import ConfigError
from lm.sweep import slurm, tpu_vm
from lm.sweep.local import manifest, manifest_text
from lm.sweep.scripts import MARK, SUFFIX, Ctx, header, install_manifest, script, train_argv, train_line
from lm.sweep.spec import CLUSTER_KEYS, Run, Sweep, check_cluster_value

KINDS = ("slurm", "tpu-vm", "shell")
# grace: seconds before the time limit SLURM warns the job script, long enough for a step and a save.
DEFAULTS = {"slurm": {"nodes": 1, "gpus_per_node": 8, "grace": 300, "setup": ()},
            "tpu_vm": {"repo_dir": "attnlab", "setup": ()}}


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
    ctx = Ctx(sweep, kind, s, out_dir, os.path.relpath(Path.cwd().resolve(), out_dir.resolve()), shlex.join(argv))
    return {**_FILES[kind](ctx, runs), "sweep.json": manifest_text(manifest(sweep))}


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


def _shell_files(ctx: Ctx, runs: list[Run]) -> dict[str, str]:
    here = ctx.here
    out = {f"{r.name}{SUFFIX['shell']}": script(header(ctx, r) + [
        "# Trains the run here; a run stopped early saved a checkpoint: running this script again resumes it.",
        "set -euo pipefail", f'cd "$(dirname "$0")/{ctx.root}"', train_line(train_argv(ctx, r))]) for r in runs}
    out["submit_all.sh"] = script(header(ctx, None) + [
        "# Trains every run here, one after another (finished runs return at once, a stopped one resumes).",
        "set -euo pipefail", f'cd "$(dirname "$0")/{ctx.root}"', install_manifest(ctx.sweep, here)]
        + [f"bash {shlex.quote(str(here / (r.name + SUFFIX['shell'])))}" for r in runs])
    return out


_FILES = {"slurm": slurm.files, "tpu-vm": tpu_vm.files, "shell": _shell_files}

__all__ = ["KINDS", "SUFFIX", "emit", "render", "settings", "default_out"]
