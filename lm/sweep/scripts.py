"""What every kind of launch script shares (lm/sweep/emit.py writes them; slurm.py and tpu_vm.py hold the kinds'
own parts): the context of one emit, the header, the `attnlab train` line of a run, the token stores the runs read,
and the checks a submit script runs before it submits anything."""
from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path
from typing import Any

from lm import storage
from lm.sweep.spec import Run, Sweep

MARK = "Written by `attnlab sweep --emit"  # in every script we write; only such files are ever removed
SUFFIX = {"slurm": ".sbatch", "tpu-vm": ".sh", "shell": ".sh"}


@dataclasses.dataclass(frozen=True)
class Ctx:
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


def header(ctx: Ctx, run: Run | None) -> list[str]:
    sweep = ctx.sweep
    what = f"Run {run.name} of sweep {sweep.name}" if run else f"Every run of sweep {sweep.name}"
    return [f"# {what} ({sweep.path}).", f"# {MARK}`; edit the spec and run it again rather than editing this file:",
            f"#   {ctx.command}"]


def script(lines: list[str]) -> str:
    return "\n".join(["#!/usr/bin/env bash", *lines]) + "\n"


def platform(ctx: Ctx) -> str | None:
    """The run.platform a job of this kind sets (None: the shell kind leaves it to the config)."""
    if ctx.kind == "slurm":
        return "gpu" if ctx.s["gpus_per_node"] else "cpu"
    return "tpu" if ctx.kind == "tpu-vm" else None


def on_bucket(ctx: Ctx, path: str) -> str:
    """Where a local path of the runs (their out_dir, a store) is for jobs that keep them in the bucket."""
    bucket = ctx.s.get("bucket")
    return storage.join(bucket, path) if bucket and not storage.is_remote(path) else path


def store_url(ctx: Ctx, store: str) -> str:
    """The bucket's copy of a local token store: <bucket>/stores/<its directory name>."""
    return on_bucket(ctx, f"stores/{Path(store).name}") if not storage.is_remote(store) else store


def train_argv(ctx: Ctx, run: Run) -> list[str]:
    """The run's `attnlab train` command as this kind's jobs run it: with the platform they must see and, for jobs
    that keep the runs in a bucket, the run directory, the token store and --init-from there."""
    sets = []
    for o in run.overrides:
        key, value = o.split("=", 1)
        sets += ["--set", f"{key}={on_bucket(ctx, value)}" if key == "run.out_dir" else o]
    source = run.cfg.data.source if run.cfg is not None else "stdlib"
    if ctx.s.get("bucket") and source in stores([run]):
        sets += ["--set", f"data.source={store_url(ctx, source)}"]
    where = platform(ctx)
    sets += ["--set", f"run.platform={where}"] if where else []
    return ["attnlab", "train", run.config, *sets] + (["--init-from", on_bucket(ctx, run.init_from)]
                                                      if run.init_from else [])


def train_line(argv: list[str], indent: str = "  ") -> str:
    """`attnlab train CONFIG \\` with one `--set KEY=VALUE` per line, every value shell-quoted."""
    args = [shlex.quote(a) for a in argv]
    head, rest = " ".join(args[:3]), args[3:]
    return " \\\n".join([head] + [indent + " ".join(rest[i:i + 2]) for i in range(0, len(rest), 2)])


def setup_lines(s: dict) -> list[str]:
    return list(s.get("setup") or ())


def stores(runs: list[Run]) -> dict[str, int]:
    """The token stores (data.source paths or URLs) the runs read -> how many runs read each."""
    out: dict[str, int] = {}
    for r in runs:
        source = r.cfg.data.source if r.cfg is not None else "stdlib"
        if source != "stdlib" and not source.startswith("synthetic:"):
            out[source] = out.get(source, 0) + 1
    return out


def preflight(checks: list[tuple[str, str]]) -> list[str]:
    """Shell lines that run every (command, error message) check and stop with exit 2, naming each failure, before
    anything is submitted. A message of "" means the command says what is wrong itself."""
    lines = ["problems=0"]
    for command, message in checks:
        say = f'echo "error: {message}" >&2; ' if message else ""
        lines.append(f"{command} || {{ {say}problems=1; }}")
    return lines + ['[ "$problems" = 0 ] || { echo "nothing submitted" >&2; exit 2; }']


def plugin_check(ctx: Ctx) -> list[tuple[str, str]]:
    """The environment's jax plugin for the jobs' platform (python -m lm.devices, which says what is missing)."""
    where = platform(ctx)
    if not where:
        return []
    return [(f"( {' && '.join([*setup_lines(ctx.s), f'python -m lm.devices {where}'])} )", "")]


def install_manifest(sweep: Sweep, here: Path) -> str:
    dst = shlex.quote(str(sweep.manifest_path))
    src = shlex.quote(str(here / "sweep.json"))
    return f"mkdir -p {shlex.quote(str(sweep.sweep_dir))} && {{ test -e {dst} || cp {src} {dst}; }}"
