"""Running a sweep here, one run after another, and its manifest `<out_dir>/<name>/sweep.json`.

The manifest lists every run of the spec with its status: "pending", "finished", "diverged" or "interrupted".
It is written when the sweep starts and rewritten (a temporary file, then a rename) as each run ends, so a reader
never sees half a file. A run's status from an earlier manifest is kept while its config and overrides are the
same (so `--only` leaves the other runs' statuses as they were).

Each run is `lm.train.train`, which resumes a killed run from its checkpoint and returns at once for a finished
one: running the same command again skips what finished and continues what did not. A run that diverges stops
the sweep (exit status 3, as `attnlab train`); SIGTERM or SIGINT stops it after the current run saved (exit 0).
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import signal
from pathlib import Path
from typing import Iterable

from rich.console import Console
from rich.table import Table

from lm.sweep.spec import Run, Sweep

STATUSES = ("pending", "finished", "diverged", "interrupted")


def manifest(sweep: Sweep, statuses: dict[str, str] | None = None) -> dict:
    """The manifest document: the sweep's identity and one entry per run (status "pending" unless given)."""
    statuses = statuses or {}
    by_label = {v.label: v for v in sweep.variants}
    return {
        "name": sweep.name, "group": sweep.group, "baseline": sweep.baseline, "description": sweep.description,
        "spec": sweep.path, "seeds": list(sweep.seeds), "configs": list(sweep.configs), "axis": list(sweep.axis),
        "metric": sweep.metric, "contrasts": [list(c) for c in sweep.contrasts],
        "runs": [{"name": r.name, "variant": r.variant, "seed": r.seed, "config": r.config,
                  "config_label": by_label[r.variant].config_label, "axis_label": by_label[r.variant].axis_label,
                  "overrides": list(r.overrides), "run_dir": r.run_dir, "status": statuses.get(r.name, "pending")}
                 for r in sweep.runs],
    }


def manifest_text(doc: dict) -> str:
    return json.dumps(doc, indent=1) + "\n"


def write_manifest(path: str | Path, doc: dict) -> None:
    """Write `doc` to `path` atomically: a temporary file next to it, then a rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(manifest_text(doc))
    os.replace(tmp, path)


def previous_statuses(sweep: Sweep) -> dict[str, str]:
    """Statuses from the sweep's existing manifest, for the runs whose config and overrides are unchanged."""
    try:
        old = json.loads(sweep.manifest_path.read_text())
        entries = {e["name"]: e for e in old["runs"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    out = {}
    for r in sweep.runs:
        e = entries.get(r.name)
        if isinstance(e, dict) and e.get("config") == r.config and e.get("overrides") == list(r.overrides) \
                and e.get("status") in STATUSES:
            out[r.name] = e["status"]
    return out


def select(sweep: Sweep, patterns: Iterable[str] | None) -> list[Run]:
    """The runs whose names match any of the fnmatch `patterns` (all runs when there are none)."""
    patterns = list(patterns or [])
    if not patterns:
        return list(sweep.runs)
    chosen = [r for r in sweep.runs if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]
    if not chosen:
        from lm.config import ConfigError

        names = [r.name for r in sweep.runs]
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} runs)" if len(names) > 8 else "")
        raise ConfigError(f"--only {' '.join(patterns)}: no run of {sweep.path} matches (runs: {shown})")
    return chosen


def final_eval_loss(run_dir: str | Path, last_eval: dict | None) -> float | None:
    """The run's last eval loss: from its result, else from the last eval record of its metrics.jsonl."""
    if last_eval and "eval_loss" in last_eval:
        return float(last_eval["eval_loss"])
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    from lm.tracking import read_metrics

    evals = [r["eval_loss"] for r in read_metrics(path) if r.get("eval_loss") is not None]
    return float(evals[-1]) if evals else None


class _Terminated(Exception):
    """SIGTERM arrived while no run's own handler was installed (between runs, or while one was compiling)."""


@contextlib.contextmanager
def _sigterm_raises():
    """Turn SIGTERM into `_Terminated` for the sweep's duration. A run that is stepping installs its own handler
    (finish the step, save, return "interrupted") and puts this one back when it returns."""
    def handle(signum, frame):
        raise _Terminated

    try:
        prev = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)


def run_local(sweep: Sweep, *, only: Iterable[str] | None = None, console: Console | None = None) -> int:
    """Train the selected runs in order. Returns the exit status: 0 (all finished, or stopped by a signal),
    3 (a run diverged)."""
    from lm.train import RunError, train

    console = console or Console()
    runs = select(sweep, only)
    statuses = previous_statuses(sweep)
    chosen = {r.name for r in runs}
    for r in runs:
        if r.init_from_run and r.init_from_run not in chosen and statuses.get(r.init_from_run) != "finished":
            raise RunError(f"run {r.name} starts from run {r.init_from_run} (init_from), which has not finished; "
                           f"include it in --only or run it first")
    write_manifest(sweep.manifest_path, manifest(sweep, statuses))
    say = lambda msg, style=None: console.print(msg, style=style, highlight=False, markup=False, soft_wrap=True)
    say(f"sweep {sweep.name}: {len(runs)} of {len(sweep.runs)} runs, manifest {sweep.manifest_path}")
    losses: dict[str, float | None] = {}
    with _sigterm_raises():
        for i, run in enumerate(runs, start=1):
            console.rule(f"[{i}/{len(runs)}] {run.name}", style="cyan")
            try:
                res = train(run.cfg, console=console, init_from=run.init_from)
            except (KeyboardInterrupt, _Terminated):
                _end(sweep, statuses, run, "interrupted")
                say(f"sweep {sweep.name} stopped: run {run.name} was interrupted; run the same command to continue "
                    f"({i - 1} of {len(runs)} runs done)", style="yellow")
                return 0
            status = "finished" if res.status in ("finished", "already_finished") else res.status
            _end(sweep, statuses, run, status)
            if status == "diverged":
                say(f"sweep {sweep.name} stopped: run {run.name} diverged ({res.message}); fix it (e.g. a lower "
                    f"optim.lr in the spec) and run the same command again", style="red")
                return 3
            if status == "interrupted":
                say(f"sweep {sweep.name} stopped: run {run.name} was interrupted at step {res.step} and saved; run "
                    f"the same command to continue ({i - 1} of {len(runs)} runs done)", style="yellow")
                return 0
            losses[run.name] = final_eval_loss(res.run_dir, res.last_eval)
            skipped = " (already finished)" if res.status == "already_finished" else ""
            loss = f"{losses[run.name]:.4f}" if losses[run.name] is not None else "n/a"
            say(f"[{i}/{len(runs)} done] {run.name}{skipped}: final eval loss {loss}", style="green")
    console.print(_summary(sweep, runs, losses))
    return 0


def _end(sweep: Sweep, statuses: dict[str, str], run: Run, status: str) -> None:
    statuses[run.name] = status
    write_manifest(sweep.manifest_path, manifest(sweep, statuses))


def _summary(sweep: Sweep, runs: list[Run], losses: dict[str, float | None]) -> Table:
    table = Table(title=f"sweep {sweep.name}: {len(runs)} runs finished (baseline {sweep.baseline})")
    for col in ("run", "variant", "seed", "final eval loss"):
        table.add_column(col, justify="right" if col in ("seed", "final eval loss") else "left")
    for r in runs:
        loss = losses.get(r.name)
        table.add_row(r.name, r.variant, str(r.seed), "n/a" if loss is None else f"{loss:.4f}")
    return table


def dry_run(sweep: Sweep, *, only: Iterable[str] | None = None, console: Console | None = None) -> int:
    """List the selected runs and their `attnlab train` command lines; nothing is trained or written."""
    import shlex

    console = console or Console()
    runs = select(sweep, only)
    statuses = previous_statuses(sweep)
    console.print(f"sweep {sweep.name} ({sweep.path}): {len(runs)} of {len(sweep.runs)} runs, variants x seeds "
                  f"{len(sweep.variants)} x {len(sweep.seeds)}, baseline {sweep.baseline}, runs in "
                  f"{sweep.sweep_dir}/", highlight=False, markup=False, soft_wrap=True)
    for r in runs:
        console.print(f"{r.name} [{statuses.get(r.name, 'pending')}]: {shlex.join(r.argv())}", highlight=False,
                      markup=False, soft_wrap=True)
    return 0


__all__ = ["manifest", "write_manifest", "previous_statuses", "select", "run_local", "dry_run", "final_eval_loss",
           "manifest_text", "STATUSES"]
