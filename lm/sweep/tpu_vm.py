"""TPU-VM launch scripts, run from a machine with gcloud (a laptop); every command runs on all workers of the pod slice,
which join one run per `attnlab train` (TPU_WORKER_HOSTNAMES).

- `setup.sh`: the token stores the runs read copied to the bucket (`<bucket>/stores/<name>`, once), this checkout's
  committed HEAD copied to every worker (`repo_dir`) and installed for the TPU (`make install DEVICE=tpu`, then
  `python -m lm.devices tpu`).
- `submit_all.sh`: checks that the stores are in the bucket, installs the manifest there, copies `queue.sh` to every
  worker and starts it detached (nohup): the runs go on when the ssh session ends.
- `queue.sh`: on each worker, every run in order; a run that fails is named and the queue goes on; each run's output
  is kept on the worker and copied to `<bucket>/<sweep dir>/logs/<run>.<worker>.log`.
- `<run>.sh`: one run in the foreground (an ssh session per worker); a dropped session's SIGHUP saves the run as
  SIGTERM does.

The workers of a pod slice share no disk, so with more than one worker the runs live in `bucket` (gs://...): their
run directories, the token stores they read and any --init-from run are the sweep's paths under it.
"""
from __future__ import annotations

import shlex
from pathlib import PurePosixPath

from lm import storage
from lm.config import ConfigError
from lm.sweep.scripts import (SUFFIX, Ctx, header, on_bucket, preflight, script, setup_lines, store_url, stores,
                              train_argv, train_line)
from lm.sweep.spec import Run


def files(ctx: Ctx, runs: list[Run]) -> dict[str, str]:
    """File name -> text of every TPU-VM script for `runs`."""
    s = ctx.s
    if s.get("workers", 0) != 1 and not s.get("bucket"):
        raise ConfigError(f"--emit tpu-vm: the {s.get('workers') or 'several'} workers of {s['name']} share no disk, "
                          f"so the runs need a bucket: set cluster.tpu_vm.bucket (e.g. gs://BUCKET/attnlab) in "
                          f"{ctx.sweep.path}, or workers: 1 for a single-host TPU VM")
    out = {f"{r.name}{SUFFIX['tpu-vm']}": job(ctx, r) for r in runs}
    out.update({"setup.sh": setup(ctx, runs), "queue.sh": queue(ctx, runs), "submit_all.sh": submit(ctx, runs)})
    return out


def _remote_path(path: str) -> str:
    """`path` quoted for the workers' shell, a leading ~/ left to it to expand."""
    return "~/" + shlex.quote(path[2:]) if path.startswith("~/") else shlex.quote(path)


def _gcloud(s: dict, *args: str) -> list[str]:
    """`gcloud compute tpus tpu-vm ARGS... --zone=Z [--project=P]`."""
    return ["gcloud", "compute", "tpus", "tpu-vm", *args, f"--zone={s['zone']}"] + \
        ([f"--project={s['project']}"] if s.get("project") else [])


def _ssh(s: dict, worker: str, command: str) -> str:
    return shlex.join(_gcloud(s, "ssh", s["name"], f"--worker={worker}")) + " \\\n  --command " + shlex.quote(command)


def _about(s: dict) -> list[str]:
    shape = ", ".join(x for x in (s.get("accelerator_type"), f"{s['workers']} workers" if s.get("workers") else None)
                      if x)
    repo = s["repo_dir"] if s["repo_dir"].startswith(("/", "~")) else f"~/{s['repo_dir']}"
    where = f"; the runs live in {s['bucket']}" if s.get("bucket") else ""
    return [f"# TPU VM {s['name']} in {s['zone']}{f' ({shape})' if shape else ''}, the repository at {repo} on every",
            f"# worker{where}."]


def _in_repo(ctx: Ctx, *commands: str) -> str:
    return " && ".join([f"cd {_remote_path(ctx.s['repo_dir'])}", *setup_lines(ctx.s), *commands])


def job(ctx: Ctx, run: Run) -> str:
    lines = header(ctx, run) + _about(ctx.s) + [
        "# One run in the foreground, on every worker: they join one run. If the ssh session drops, the run saves and",
        "# stops (SIGHUP); running this script again resumes it. submit_all.sh runs every run detached instead.",
        "set -euo pipefail", _ssh(ctx.s, "all", _in_repo(ctx, shlex.join(train_argv(ctx, run))))]
    return script(lines)


def _log_dir(ctx: Ctx) -> str:
    return f"~/attnlab-logs/{shlex.quote(ctx.sweep.name)}"


def queue(ctx: Ctx, runs: list[Run]) -> str:
    """The script every worker runs (submit_all.sh starts it): every run in order, going on past a failed one."""
    s, logs = ctx.s, _log_dir(ctx)
    copy_up = (f'  gcloud storage cp "$logs/$name.log" '
               f'{shlex.quote(on_bucket(ctx, str(ctx.sweep.sweep_dir / "logs")))}/"$name.$(hostname).log" '
               f'>/dev/null 2>&1 || echo "could not copy $name\'s log to the bucket"') if s.get("bucket") else None
    lines = header(ctx, None) + [
        "# Runs on every worker of the TPU VM, started detached by submit_all.sh: every run in order. A run that fails",
        "# is named and the queue goes on; at the end it names the runs that failed. Each run's output is in",
        f"# {logs}/RUN.log" + (" and, after the run, in the bucket's logs/RUN.WORKER.log." if copy_up else "."),
        "set -uo pipefail", f"cd {_remote_path(s['repo_dir'])}", *setup_lines(s), f"logs={logs}", 'mkdir -p "$logs"',
        "failed=()",
        "run() {  # NAME COMMAND...",
        "  local name=$1 status=0; shift",
        "  echo \"$(date '+%F %T') $name: starting\"",
        '  "$@" >> "$logs/$name.log" 2>&1 || status=$?',
        "  if [ \"$status\" = 0 ]; then echo \"$(date '+%F %T') $name: ended\"; else",
        "    echo \"$(date '+%F %T') $name: failed with exit status $status (its log: $logs/$name.log)\"; "
        'failed+=("$name"); fi',
        *([copy_up] if copy_up else []),
        "}",
    ]
    lines += [f"run {shlex.quote(r.name)} " + train_line(train_argv(ctx, r)) for r in runs]
    lines += ['if [ "${#failed[@]}" -gt 0 ]; then',
              f'  echo "queue ended: ${{#failed[@]}} of {len(runs)} runs failed: ${{failed[*]}}"; exit 1',
              "fi", f'echo "queue ended: all {len(runs)} runs ended"']
    return script(lines)


def _store_checks(ctx: Ctx, runs: list[Run], fix: str) -> list[tuple[str, str]]:
    """Every store the runs read is in the bucket (a URL store: where it is)."""
    return [(f"gcloud storage ls {shlex.quote(store_url(ctx, store) + '/meta.json')} >/dev/null 2>&1",
             f"token store {store_url(ctx, store)} (data.source of {n} run(s)) is not there: {fix}")
            for store, n in stores(runs).items() if ctx.s.get("bucket") or storage.is_remote(store)]


def setup(ctx: Ctx, runs: list[Run]) -> str:
    s = ctx.s
    lines = header(ctx, None) + _about(s) + [
        "# Prepares the TPU VM: the token stores the runs read copied to the bucket (once; meta.json last, so a copy",
        "# that has it is complete), this checkout's committed HEAD copied to every worker and installed for the TPU.",
        "set -euo pipefail", f'cd "$(dirname "$0")/{ctx.root}"']
    for store in stores(runs):
        if storage.is_remote(store) or not s.get("bucket"):
            continue
        url, q = store_url(ctx, store), shlex.quote(store)
        lines += [f"test -f {q}/meta.json || {{ echo \"error: token store {store} is not here: prepare it first "
                  f"(attnlab data prepare ... --out {store})\" >&2; exit 2; }}",
                  f"gcloud storage ls {shlex.quote(url + '/meta.json')} >/dev/null 2>&1 || {{ gcloud storage rsync -r "
                  f"-x 'meta\\.json$' {q} {shlex.quote(url)} && gcloud storage cp {q}/meta.json "
                  f"{shlex.quote(url + '/meta.json')}; }}"]
    archive, repo = "attnlab-src.tar.gz", _remote_path(s["repo_dir"])
    lines += ['[ -z "$(git status --porcelain --untracked-files=no)" ] || echo "warning: uncommitted changes are not '
              'copied (the workers get the committed HEAD)" >&2',
              'tmp=$(mktemp -d)', 'trap \'rm -rf "$tmp"\' EXIT',
              f'git archive --format=tar.gz -o "$tmp/{archive}" HEAD',
              shlex.join(_gcloud(s, "scp", f"$tmp/{archive}", f"{s['name']}:{archive}", "--worker=all"))
              .replace(shlex.quote(f"$tmp/{archive}"), f'"$tmp/{archive}"'),
              _ssh(s, "all", f"mkdir -p {repo} && tar -xzf {archive} -C {repo} && cd {repo} && make install "
                             f"DEVICE=tpu && .venv/bin/python -m lm.devices tpu"),
              'echo "every worker has the code and jax for the TPU; next: submit_all.sh"']
    return script(lines)


def submit(ctx: Ctx, runs: list[Run]) -> str:
    s, sweep = ctx.s, ctx.sweep
    name = f"attnlab-queue-{sweep.name}"
    if s.get("bucket"):
        manifest = on_bucket(ctx, str(sweep.manifest_path))
        install = (f"gcloud storage ls {shlex.quote(manifest)} >/dev/null 2>&1 || gcloud storage cp sweep.json "
                   f"{shlex.quote(manifest)}")
    else:  # one worker: the runs are in the repository on its disk
        remote = str(PurePosixPath(s["repo_dir"].rstrip("/")) / sweep.sweep_dir)
        install = (_ssh(s, "0", f"mkdir -p {_remote_path(remote)} && test -e {_remote_path(remote + '/sweep.json')}")
                   + " || " + shlex.join(_gcloud(s, "scp", "sweep.json", f"{s['name']}:{remote}/sweep.json",
                                                 "--worker=0")))
    lines = header(ctx, None) + _about(s) + [
        "# Starts the queue (queue.sh) on every worker, detached: it runs every run in order and goes on when this",
        "# machine goes away. Run setup.sh first. The manifest goes where the runs are, unless one is there already.",
        "set -euo pipefail", 'cd "$(dirname "$0")"',
        *preflight(_store_checks(ctx, runs, "run setup.sh first")), install,
        shlex.join(_gcloud(s, "scp", "queue.sh", f"{s['name']}:{name}.sh", "--worker=all")),
        _ssh(s, "all", f"nohup bash {name}.sh > {name}.log 2>&1 < /dev/null &"),
        f'echo "the queue runs on every worker; follow it with: '
        f'{shlex.join(_gcloud(s, "ssh", s["name"], "--worker=0"))} --command \'tail -f {name}.log\'"']
    return script(lines)
