"""SLURM launch scripts: `<run>.sbatch` per run, `array.sbatch` (the runs without init_from as one array job) and
`submit_all.sh`.

Each job appends its output to `<sweep dir>/logs/<run>.log` (the script makes the directory: SLURM's own --output
fails a job whose directory is missing), every attempt under a header line. `--signal=B:USR1@grace` warns the
script before the time limit: it tells the run to stop (SIGTERM: save and exit 0) and requeues the job
(`--requeue`), which resumes from that checkpoint, until the run is finished. submit_all.sh checks the token stores
and the environment's jax plugin first, submits the runs as one array job (`%max_running` at a time), and each run
with init_from as its own job after its source (`afterok`); a rejected job is named and the rest still go in.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from lm.sweep.scripts import (SUFFIX, Ctx, header, install_manifest, plugin_check, preflight, script, setup_lines,
                              stores, train_argv, train_line)
from lm.sweep.spec import Run


def files(ctx: Ctx, runs: list[Run]) -> dict[str, str]:
    """File name -> text of every SLURM script for `runs`."""
    out = {f"{r.name}{SUFFIX['slurm']}": job(ctx, r) for r in runs}
    if any(r.init_from_run is None for r in runs):
        out["array.sbatch"] = array(ctx, [r for r in runs if r.init_from_run is None])
    out["submit_all.sh"] = submit(ctx, runs)
    return out


def store_checks(runs: list[Run]) -> list[tuple[str, str]]:
    """Every token store the runs read exists here."""
    return [(f"test -f {shlex.quote(store)}/meta.json",
             f"token store {store} (data.source of {n} run(s)) does not exist: prepare it first (attnlab data prepare "
             f"--source FILES --tokenizer TOKENIZER --out {store})") for store, n in stores(runs).items()]


def directives(ctx: Ctx, job_name: str) -> list[str]:
    s = ctx.s
    lines = [f"#SBATCH --job-name={job_name}"]
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
    # The job writes its own log (see job); WANDB_* and the rest of the submitting shell's environment go in.
    return lines + ["#SBATCH --output=/dev/null", "#SBATCH --export=ALL", "#SBATCH --requeue",
                    f"#SBATCH --signal=B:USR1@{s['grace']}"]


def log_path(ctx: Ctx, run: Run) -> str:
    return str(ctx.sweep.sweep_dir / "logs" / f"{run.name}.log")


def job(ctx: Ctx, run: Run) -> str:
    s, log = ctx.s, log_path(ctx, run)
    lines = directives(ctx, f"{ctx.sweep.name}.{run.name}") + header(ctx, run)
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
        *setup_lines(s),
        'echo "W&B settings from the environment: $(compgen -e | grep \'^WANDB_\' | tr \'\\n\' \' \' || true)"',
        "stopping=0",
        "trap 'stopping=1; echo \"time limit in " + str(s["grace"]) + " s: stopping the run to save it\"; "
        "scancel --signal=TERM \"$SLURM_JOB_ID\" || true' USR1",
        "srun " + train_line(train_argv(ctx, run)) + " &",
        "train=$!",
        "# wait returns early when the trap runs; wait again until the run has exited.",
        'while :; do wait "$train" && status=0 || status=$?; kill -0 "$train" 2>/dev/null || break; done',
        'if [ "$stopping" = 1 ] && [ "$status" = 0 ]; then',
        '  echo "saved; requeueing job $SLURM_JOB_ID to go on from the checkpoint"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$status"',
    ]
    return script(lines)


def array(ctx: Ctx, runs: list[Run]) -> str:
    """One array job over `runs`: task i runs the i-th run's job script (its #SBATCH lines are this file's)."""
    names = " ".join(shlex.quote(r.name) for r in runs)
    lines = directives(ctx, ctx.sweep.name) + header(ctx, None) + [
        "# The runs without init_from as one array job (submit_all.sh submits it with --array=0-N%max_running):",
        "# task i runs the i-th run's job script here, with its own log, requeues and job id.",
        "set -euo pipefail",
        'cd "${SLURM_SUBMIT_DIR:-.}"',
        f"runs=({names})",
        f'exec bash {shlex.quote(str(ctx.here))}/"${{runs[$SLURM_ARRAY_TASK_ID]}}{SUFFIX["slurm"]}"',
    ]
    return script(lines)


def submit(ctx: Ctx, runs: list[Run]) -> str:
    sweep, here, s = ctx.sweep, ctx.here, ctx.s
    first = [r for r in runs if r.init_from_run is None]
    limit = f"%{s['max_running']}" if s.get("max_running") else ""
    lines = header(ctx, None) + [
        "# Submits the sweep from the repository root, after checking that every token store exists and that the",
        "# environment has jax's plugin for the jobs. The runs go in as one array job"
        + (f", at most {s['max_running']} running at once;" if limit else ";"),
        "# a run that starts from another run's checkpoint (init_from) as its own job after that run (afterok). A",
        "# job SLURM rejects is named, and the others are still submitted.",
        "set -euo pipefail", f'cd "$(dirname "$0")/{ctx.root}"', *preflight(store_checks(runs) + plugin_check(ctx)),
        install_manifest(sweep, here), "rejected=()", "array="]
    # The shell expression of each run's job id; empty when its job was not submitted.
    ids = {r.name: f"${{array:+${{array}}_{i}}}" for i, r in enumerate(first)}
    if first:
        names = " ".join(r.name for r in first)
        lines += [f"if array=$(sbatch --parsable --array=0-{len(first) - 1}{limit} "
                  f"{shlex.quote(str(here / 'array.sbatch'))}); then",
                  f'  array=${{array%%;*}}; echo "array job $array, task i runs the i-th of: {names}"',
                  f"else array=; rejected+=({names}); fi"]
    for i, r in enumerate(r for r in runs if r.init_from_run is not None):
        path = shlex.quote(str(here / (r.name + SUFFIX["slurm"])))
        if r.init_from_run in ids:  # else its source is not part of this submission (--only): it has finished
            lines += [f'src="{ids[r.init_from_run]}"',
                      f'if [ -n "$src" ] && job{i}=$(sbatch --parsable --dependency=afterok:"$src" {path}); then']
        else:
            lines.append(f"if job{i}=$(sbatch --parsable {path}); then")
        lines += [f'  job{i}=${{job{i}%%;*}}; echo "{r.name}: job $job{i}, after {r.init_from_run}"',
                  f"else job{i}=; rejected+=({r.name}); fi"]
        ids[r.name] = f"$job{i}"
    lines += ['if [ "${#rejected[@]}" -gt 0 ]; then',
              "  echo \"error: not submitted: ${rejected[*]} (SLURM's message is above, or the run they start from was "
              f"not submitted); submit each with sbatch {here}/RUN.sbatch once fixed\" >&2",
              "  exit 1", "fi"]
    return script(lines)
