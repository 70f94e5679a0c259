"""Running a sweep here, one run after another, and its manifest `<out_dir>/<name>/sweep.json`.

The manifest lists every run of the spec with its status: "pending", "finished", "diverged" or "interrupted".
It is written when the sweep starts and rewritten (a temporary file, then a rename) as each run ends, so a reader
never sees half a file. A run's status from an earlier manifest is kept while its config and overrides are the
same (so `--only` leaves the other runs' statuses as they were).

Each run is `lm.train.train`, which resumes a killed run from its checkpoint and returns at once for a finished
one: running the same command again skips what finished and continues what did not. A run that diverges stops
the sweep (exit status 3, as `attnlab train`), except a tuning run of a `tune` sweep, for which diverging is an
outcome (its value is then never chosen); SIGTERM or SIGINT stops it after the current run saved (exit 0). In a
`tune` sweep a variant's runs for every seed are added as soon as its tuning runs have ended (lm/sweep/tune.py);
until then the manifest lists them as pending, waiting for the tuning.
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
    """The manifest document: the sweep's identity and one entry per run (status "pending" unless given). A
    `tune` sweep also has its tuning settings and choices; its tuning runs say `"stage": "tune"`, and the runs of
    a variant still waiting for its value are listed without overrides."""
    statuses = statuses or {}
    by_label = {v.label: v for v in sweep.variants}

    def source(r):
        return by_label[_tuned(sweep, r)[0]] if r.stage == "tune" else by_label[r.variant]

    runs = [{"name": r.name, "variant": r.variant, "seed": r.seed, "config": r.config,
             "config_label": source(r).config_label, "axis_label": source(r).axis_label,
             "overrides": list(r.overrides), "run_dir": r.run_dir, "status": statuses.get(r.name, "pending"),
             **({"stage": r.stage} if sweep.tune else {}), **({"reuses": r.reuses} if r.reuses else {})}
            for r in sweep.runs]
    runs += [{"name": f"{v}-s{seed}", "variant": v, "seed": seed, "config": by_label[v].config,
              "config_label": by_label[v].config_label, "axis_label": by_label[v].axis_label, "overrides": None,
              "run_dir": f"{sweep.sweep_dir}/{v}-s{seed}", "status": "pending", "stage": "main", "waiting": "tuning"}
             for seed in sweep.seeds for v in sweep.waiting]
    tune = {"tune": {"key": sweep.tune.key, "values": list(sweep.tune.values), "seed": sweep.tune.seed,
                     "choices": dict(sweep.choices),
                     **({"extend": sweep.tune.extend, "extensions": {v: list(x) for v, x in sweep.extensions.items()}}
                        if sweep.tune.extend else {})}} if sweep.tune else {}
    from lm.sweep.evals import pending, result_path

    evals = {"evals": [{"name": f"{e.label}-s{r.seed}", "variant": e.label, "seed": r.seed, "of": r.name,
                        "run_dir": r.run_dir, "result": str(result_path(sweep, e, r.seed)), "settings": e.settings()}
                       for e, r in pending(sweep)]} if sweep.evals else {}
    return {
        "name": sweep.name, "group": sweep.group, "baseline": sweep.baseline, "description": sweep.description,
        "spec": sweep.path, "seeds": list(sweep.seeds), "configs": list(sweep.configs), "axis": list(sweep.axis),
        "metric": sweep.metric, "contrasts": [list(c) for c in sweep.contrasts], **tune, "runs": runs, **evals,
    }


def _news(sweep: Sweep, runs: list[Run]) -> str:
    """What the tuning runs that just ended decided: the values chosen, and the values tried beyond the grid."""
    chosen = list(dict.fromkeys(r.variant for r in runs if r.stage == "main"))
    beyond = [_tuned(sweep, r) for r in runs if r.stage == "tune"]
    parts = [f"tuning chose {', '.join(f'{v} {sweep.tune.key}={sweep.choices[v]}' for v in chosen)}"] if chosen else []
    if beyond:
        parts.append("best at the edge of what they tried, so tuning goes on with " +
                     ", ".join(f"{v} {sweep.tune.key}={x}" for v, x in beyond))
    return "; ".join(parts)


def _tuned(sweep: Sweep, run: Run) -> tuple[str, object]:
    """(the variant, the value) a tuning run tries."""
    return next((v.label, x) for v in sweep.variants for x in sweep.tried(v.label)
                if run.variant == f"{v.label}-{sweep.tune.tag(x)}")


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


def select(sweep: Sweep, patterns: Iterable[str] | None, *, allow_none: bool = False) -> list[Run]:
    """The runs whose names match any of the fnmatch `patterns` (all runs when there are none); none matching is
    an error unless `allow_none`."""
    patterns = list(patterns or [])
    if not patterns:
        return list(sweep.runs)
    chosen = [r for r in sweep.runs if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]
    if not chosen and not allow_none:
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
    """Train the selected runs in order (in a `tune` sweep, each variant's runs once its tuning runs have ended).
    Returns the exit status: 0 (all finished, or stopped by a signal), 3 (a run diverged)."""
    from lm.sweep.tune import resolved
    from lm.train import RunError

    console = console or Console()
    sweep = resolved(sweep, previous_statuses(sweep))
    runs = select(sweep, only, allow_none=bool(sweep.waiting))
    statuses = previous_statuses(sweep)
    chosen = {r.name for r in runs}
    for r in runs:
        if r.init_from_run and r.init_from_run not in chosen and statuses.get(r.init_from_run) != "finished":
            raise RunError(f"run {r.name} starts from run {r.init_from_run} (init_from), which has not finished; "
                           f"include it in --only or run it first")
    write_manifest(sweep.manifest_path, manifest(sweep, statuses))
    say = lambda msg, style=None: console.print(msg, style=style, highlight=False, markup=False, soft_wrap=True)
    waiting = f" (+ the runs of {len(sweep.waiting)} variants once their tuning ends)" if sweep.waiting else ""
    say(f"sweep {sweep.name}: {len(runs)} of {len(sweep.runs)} runs{waiting}, manifest {sweep.manifest_path}")
    losses: dict[str, float | None] = {}
    done: list[Run] = []
    with _sigterm_raises():
        while runs:
            total = len(done) + len(runs)
            for run in runs:
                code = _train_one(sweep, statuses, run, f"{len(done) + 1}/{total}", say, console, losses)
                if code is not None:
                    return code
                done.append(run)
            before = {r.name for r in sweep.runs}
            sweep = resolved(sweep, statuses)
            runs = [r for r in select(sweep, only, allow_none=True) if r.name not in before]
            if runs:
                write_manifest(sweep.manifest_path, manifest(sweep, statuses))
                say(f"sweep {sweep.name}: {_news(sweep, runs)}; {len(runs)} more runs")
    if sweep.waiting:
        say(f"sweep {sweep.name}: no value chosen for {', '.join(sweep.waiting)} (their tuning runs have not all "
            f"ended, or all diverged); their other runs did not start", style="yellow")
    if sweep.evals:
        from lm.sweep.evals import run_evals

        run_evals(sweep, statuses, say)
        write_manifest(sweep.manifest_path, manifest(sweep, statuses))
    console.print(_summary(sweep, done, losses))
    return 0


def _train_one(sweep: Sweep, statuses: dict[str, str], run: Run, i: str, say, console: Console,
               losses: dict[str, float | None]) -> int | None:
    """Train one run (`i`: its place, 'k/n') and record its status; the sweep's exit status when it must stop
    here, else None."""
    from lm.train import train

    console.rule(f"[{i}] {run.name}", style="cyan")
    if run.reuses:
        _end(sweep, statuses, run, statuses.get(run.reuses, "pending"))
        say(f"[{i} done] {run.name} is tuning run {run.reuses}", style="green")
        return None
    if run.stage == "tune" and statuses.get(run.name) == "diverged":  # an outcome: training it again diverges again
        say(f"[{i} done] tuning run {run.name} diverged earlier; its value stays out", style="yellow")
        return None
    try:
        res = train(run.cfg, console=console, init_from=run.init_from)
    except (KeyboardInterrupt, _Terminated):
        _end(sweep, statuses, run, "interrupted")
        say(f"sweep {sweep.name} stopped: run {run.name} was interrupted; run the same command to continue "
            f"(run {i} of those selected)", style="yellow")
        return 0
    status = "finished" if res.status in ("finished", "already_finished") else res.status
    _end(sweep, statuses, run, status)
    if status == "diverged" and run.stage == "tune":
        say(f"[{i} done] tuning run {run.name} diverged ({res.message}); its value is out", style="yellow")
        return None
    if status == "diverged":
        say(f"sweep {sweep.name} stopped: run {run.name} diverged ({res.message}); fix it (e.g. a lower "
            f"optim.lr in the spec) and run the same command again", style="red")
        return 3
    if status == "interrupted":
        say(f"sweep {sweep.name} stopped: run {run.name} was interrupted at step {res.step} and saved; run "
            f"the same command to continue (run {i} of those selected)", style="yellow")
        return 0
    losses[run.name] = final_eval_loss(res.run_dir, res.last_eval)
    skipped = " (already finished)" if res.status == "already_finished" else ""
    loss = f"{losses[run.name]:.4f}" if losses[run.name] is not None else "n/a"
    say(f"[{i} done] {run.name}{skipped}: final eval loss {loss}", style="green")
    return None


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

    from lm.sweep.tune import resolved

    console = console or Console()
    sweep = resolved(sweep, previous_statuses(sweep))
    runs = select(sweep, only, allow_none=bool(sweep.waiting))
    statuses = previous_statuses(sweep)
    if sweep.waiting:
        console.print(f"waiting for their tuning runs ({sweep.tune.key} in {list(sweep.tune.values)} on seed "
                      f"{sweep.tune.seed}): the runs of {', '.join(sweep.waiting)} for seeds {list(sweep.seeds)}",
                      highlight=False, markup=False, soft_wrap=True)
    console.print(f"sweep {sweep.name} ({sweep.path}): {len(runs)} of {len(sweep.runs)} runs, variants x seeds "
                  f"{len(sweep.variants)} x {len(sweep.seeds)}, baseline {sweep.baseline}, runs in "
                  f"{sweep.sweep_dir}/", highlight=False, markup=False, soft_wrap=True)
    for r in runs:
        console.print(f"{r.name} [{statuses.get(r.name, 'pending')}]: {shlex.join(r.argv())}", highlight=False,
                      markup=False, soft_wrap=True)
    return 0


__all__ = ["manifest", "write_manifest", "previous_statuses", "select", "run_local", "dry_run", "final_eval_loss",
           "manifest_text", "STATUSES"]
