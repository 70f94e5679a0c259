"""`attnlab sweep SPEC`: run a sweep here (--local), write its launch scripts (--emit), or list it (--dry-run).

`add_parser(subparsers)` adds the subcommand to the `attnlab` parser; `cmd_sweep(args)` runs it and returns the
exit status (0, or 3 when a run diverged). Mistakes in the spec or the arguments raise `ConfigError`, which the
`attnlab` entry point prints as one `error:` line with exit status 2.
"""
from __future__ import annotations

import argparse
import shlex

from lm.config import ConfigError

CLUSTER_FLAGS = {"partition": "slurm", "nodes": "slurm", "gpus_per_node": "slurm", "time": "slurm",
                 "tpu_name": "tpu-vm", "zone": "tpu-vm"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `sweep` to an argparse subparsers object (that of `attnlab`)."""
    sw = subparsers.add_parser(
        "sweep", help="configs x overrides x seeds from a spec (experiments/sweeps/*.yaml): train them here one "
                      "after another, or write SLURM / TPU-VM / shell launch scripts")
    sw.add_argument("spec", help="a sweep spec, e.g. experiments/sweeps/projection_sharing_tiny.yaml")
    mode = sw.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true",
                      help="train the runs here, one after another; rerunning skips finished runs and resumes a "
                           "stopped one")
    mode.add_argument("--emit", choices=("slurm", "tpu-vm", "shell"), default=None, metavar="KIND",
                      help="write launch scripts instead of training: slurm, tpu-vm or shell")
    sw.add_argument("--only", action="append", default=[], metavar="PATTERN",
                    help="only the runs whose names match this shell pattern, e.g. 'share_*-s0' (repeatable)")
    sw.add_argument("--dry-run", action="store_true", help="list the runs and their commands; train nothing")
    sw.add_argument("--report", action="store_true",
                    help="--local: when every run has finished, write `attnlab report`'s table and plots "
                         "(experiments/results/<name>/)")
    sw.add_argument("--out", default=None, metavar="DIR",
                    help="--emit: where to write the scripts (default <out_dir>/<name>/launch/<kind>/)")
    sl = sw.add_argument_group("--emit slurm (default: the spec's cluster.slurm)")
    sl.add_argument("--partition", default=None, help="SLURM partition (#SBATCH --partition)")
    sl.add_argument("--nodes", type=int, default=None, metavar="N",
                    help="nodes per run; with more than one they join one jax.distributed run")
    sl.add_argument("--gpus-per-node", type=int, default=None, metavar="N", help="GPUs per node (#SBATCH)")
    sl.add_argument("--time", default=None, metavar="LIMIT", help="time limit per run, e.g. 24:00:00")
    tp = sw.add_argument_group("--emit tpu-vm (default: the spec's cluster.tpu_vm)")
    tp.add_argument("--tpu-name", default=None, metavar="NAME", help="the TPU VM (pod slice) to run on")
    tp.add_argument("--zone", default=None, help="its zone, e.g. us-east5-a")
    sw.set_defaults(fn=cmd_sweep)
    return sw


def cmd_sweep(args) -> int:
    from lm.sweep.emit import SUFFIX, emit
    from lm.sweep.local import dry_run, run_local, select
    from lm.sweep.spec import load_sweep

    given = {k: getattr(args, k, None) for k in CLUSTER_FLAGS}
    for key, value in given.items():
        if value is not None and args.emit != CLUSTER_FLAGS[key]:
            raise ConfigError(f"--{key.replace('_', '-')} applies to --emit {CLUSTER_FLAGS[key]}")
    if args.out is not None and args.emit is None:
        raise ConfigError("--out applies to --emit")
    if args.report and not args.local:
        raise ConfigError("--report applies to --local")
    if not (args.local or args.emit or args.dry_run):
        raise ConfigError("say what to do: --local (train here), --emit slurm|tpu-vm|shell (write launch scripts) "
                          "or --dry-run (list the runs)")
    sweep = load_sweep(args.spec)
    if args.dry_run:
        return dry_run(sweep, only=args.only)
    if args.emit:
        from lm.sweep.local import previous_statuses
        from lm.sweep.tune import resolved

        sweep = resolved(sweep, previous_statuses(sweep))
        flags = {"name" if k == "tpu_name" else k: v for k, v in given.items()}
        runs = select(sweep, args.only)
        out, files = emit(sweep, args.emit, args.out, runs, flags, args.only)
        beside = [n for n in files if n not in {r.name + SUFFIX[args.emit] for r in runs}]
        print(f"wrote {len(runs)} {args.emit} job script(s) and {', '.join(beside)} to {out}/; run "
              f"{out}/submit_all.sh")
        if sweep.waiting:
            print(f"the runs of {', '.join(sweep.waiting)} wait for their tuning runs: once those have ended (and "
                  f"their sweep.json is here), run this command again to write them")
        return 0
    code = run_local(sweep, only=args.only)
    if code == 0 and args.report:
        from lm.report.cli import make_report
        from lm.sweep.local import previous_statuses
        from lm.sweep.tune import resolved

        sweep = resolved(sweep, previous_statuses(sweep))
        statuses = previous_statuses(sweep)
        if args.only or sweep.waiting or any(statuses.get(r.name) != "finished" for r in sweep.runs
                                             if r.stage == "main"):
            print("report not written: not every run of the sweep has finished (run the whole sweep again)")
            return code
        out = make_report([sweep.sweep_dir], key=sweep.metric, command=shlex.join(["attnlab", "sweep", args.spec, "--local",
                                                                  "--report"]))
        print(f"report: {out['markdown']}")
    return code


__all__ = ["add_parser", "cmd_sweep"]
