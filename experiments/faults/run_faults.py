"""Fault injection on a tiny run: what `attnlab train` does when it is killed, runs out of disk, meets a second
writer or a read-only run directory. Every case runs the real command line in subprocesses on a ~60K-parameter
model (tests/lm/conftest.py `tiny_overrides`) over a byte-level token store this script writes from the running
Python's standard library into a temporary directory; nothing is downloaded.

    python -m experiments.faults.run_faults            # all cases; writes experiments/results/faults.md
    python -m experiments.faults.run_faults --kills 2 --steps 24 --no-mounts --write none   # the short version

Cases (each compares with an uninterrupted reference run of the same config; on CPU losses must be equal):

- kills: SIGKILL the run `--kills` times at random moments, resume each time, finish. Every other kill waits for
  a checkpoint save to be in progress (orbax's `*.orbax-checkpoint-tmp` directory of a later step than a complete
  checkpoint) and lands a random 0-60 ms into it; the others land 0.5-6 s after the start (start-up, compile,
  restore or the first steps) or 0-2 s after training resumed. metrics.jsonl must hold every step once with the
  reference's values, and the union of the W&B offline files' history every step of metrics.jsonl with equal
  values. Every restart is the same command: a kill before the first checkpoint completed leaves metrics but
  nothing to resume, and the run then starts again from step 0 by itself (keeping those metrics beside).
- full_disk: the run directory on a 20 MB tmpfs filled by a ballast file to about 1.25 MB free: a save fails,
  which must give one `error:` line and exit status 2 and leave no orbax temporary directory; with the ballast
  removed the run resumes and finishes with the reference's losses.
- two_writers: a second `attnlab train` on a run directory in use must exit with status 2 naming the first
  one's pid. The first is paused (SIGSTOP; it keeps its lock as any live process does) while the second runs,
  so its files can be compared byte for byte before and after; resumed, it finishes with the reference's losses.
- read_only: resuming a run whose directory is read-only (a read-only bind mount as root, else chmod -R a-w)
  and starting a fresh run under a read-only directory must each give one `error:` line naming the directory,
  exit status 2 and change nothing; made writable again, the run resumes and finishes with the reference's losses.

The mount cases need root (mount(2)); without it they are skipped with the reason, or `--no-mounts` skips them.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

from lm import data as lmdata
from lm.flops import cpu_model
from lm.tracking import read_metrics
from tests.lm.conftest import tiny_overrides
from tests.lm.wandb_reader import history as wandb_history

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/tiny/softmax.yaml"
RESULTS = ROOT / "experiments" / "results" / "faults.md"
TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Values a run computes (the same on every rerun on CPU); tokens_per_s and mfu are timings.
EXACT_KEYS = ("loss", "loss_avg", "lr", "grad_norm", "rejected_steps", "aux_loss", "eval_loss", "eval_ppl", "eval_bpb",
              "eval_acc")
TMPFS_MB = 20
FREE_BYTES = 1_250_000  # left free on the tmpfs: two or three checkpoints of the tiny model fit, then a save fails


@dataclasses.dataclass
class Result:
    case: str
    status: str  # "pass" | "FAIL" | "skipped"
    details: str
    seconds: float

    @classmethod
    def judged(cls, case: str, problems: list[str], passed: str, t0: float) -> "Result":
        """FAIL with the problems when there are any, else pass with what was shown."""
        return cls(case, "FAIL" if problems else "pass", "; ".join(problems) if problems else passed,
                   time.perf_counter() - t0)


@dataclasses.dataclass
class Proc:
    rc: int
    out: str
    err: str
    seconds: float


class Faults:
    """The shared pieces: the token store, the command line, the reference run's metrics."""

    def __init__(self, work: Path, steps: int, log: Callable[[str], None]):
        self.work, self.steps, self.log = work, steps, log
        self.store = self._make_store()
        self.reference: list[dict] = []

    def _make_store(self) -> Path:
        """~1.5 MB of the standard library's .py files as .txt documents, byte-tokenized."""
        src = self.work / "corpus"
        src.mkdir()
        size = 0
        for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
            (src / (p.stem + ".txt")).write_text(p.read_text(errors="replace"))
            size += p.stat().st_size
            if size > 1_500_000:
                break
        return lmdata.prepare([str(src)], "byte", self.work / "store", log=None)

    def command(self, out_dir: Path, name: str, **extra) -> list[str]:
        over = tiny_overrides(self.store, out_dir, name, **{"train.steps": self.steps, **extra})
        return [sys.executable, "-m", "lm.cli", "train", CONFIG, *sum((["--set", o] for o in over), [])]

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
        return {**env, "JAX_PLATFORMS": "cpu", "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false"}

    def run(self, cmd: list[str], timeout: float = 300) -> Proc:
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=timeout)
        return Proc(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0)

    def start(self, cmd: list[str], log_name: str) -> subprocess.Popen:
        out = open(self.work / f"{log_name}.log", "w")  # a file, not a pipe: a killed child never blocks on it
        return subprocess.Popen(cmd, cwd=ROOT, env=self.env(), stdout=out, stderr=subprocess.STDOUT)

    def compare(self, run_dir: Path) -> list[str]:
        """Problems with run_dir's metrics.jsonl against the reference: every step once, equal values."""
        rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
        problems = []
        train_steps = [r["step"] for r in rows if "loss" in r]
        if train_steps != list(range(1, self.steps + 1)):
            problems.append(f"train steps logged {_ranges(train_steps)}, expected 1-{self.steps} once each")
        if _exact(rows) != _exact(self.reference):
            diff = sorted(set(_exact(rows).items()) ^ set(_exact(self.reference).items()))[:3]
            problems.append(f"values differ from the uninterrupted run, e.g. {diff}")
        return problems


def _exact(rows: list[dict]) -> dict:
    return {(r["step"], k): r[k] for r in rows for k in EXACT_KEYS if k in r}


def _ranges(steps: list[int]) -> str:
    if not steps:
        return "none"
    dup = len(steps) - len(set(steps))
    return f"{min(steps)}-{max(steps)} ({len(steps)} records" + (f", {dup} repeated" if dup else "") + ")"


def _wandb_problems(run_dir: Path) -> tuple[list[str], int]:
    """Problems with the W&B offline files of run_dir against its metrics.jsonl, and how many files there are.
    Every (step, key) of metrics.jsonl must be in some file, and every row of that step must agree."""
    files = sorted((run_dir / "wandb").glob("offline-run-*/*.wandb"))
    logged: dict[tuple[int, str], set] = {}
    for f in files:
        for row in wandb_history(f):
            for k in EXACT_KEYS:
                if k in row:
                    logged.setdefault((int(row["_step"]), k), set()).add(row[k])
    missing, unequal = [], []
    for (step, k), v in _exact(read_metrics(run_dir / "metrics.jsonl")).items():
        got = logged.get((step, k))
        if got is None:
            missing.append((step, k))
        elif got != {v}:
            unequal.append((step, k, v, sorted(got)))
    problems = []
    if missing:
        problems.append(f"W&B lacks {len(missing)} metrics values, e.g. {missing[:3]}")
    if unequal:
        problems.append(f"W&B has other values for {len(unequal)}, e.g. {unequal[:2]}")
    return problems, len(files)


def _tmp_dirs(ckpt_dir: Path) -> set[tuple[str, int]]:
    try:
        return {(e.name, e.inode()) for e in os.scandir(ckpt_dir) if TMP_SUFFIX in e.name}
    except FileNotFoundError:
        return set()


def _checkpoints(ckpt_dir: Path) -> list[int]:
    try:
        return sorted(int(e.name) for e in os.scandir(ckpt_dir) if e.name.isdigit())
    except FileNotFoundError:
        return []


def _max_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = []
    for ln in lines:
        try:
            steps.append(json.loads(ln)["step"])
        except (ValueError, KeyError):  # a line being written
            pass
    return max(steps, default=0)


def _wait(pred: Callable[[], bool], timeout: float, interval: float = 0.002) -> bool:
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def _error_line(p: Proc) -> tuple[str, list[str]]:
    """The one `error:` line of a failed command, and what is wrong with its stderr."""
    lines = [ln for ln in p.err.splitlines() if ln.strip()]
    problems = []
    if p.rc != 2:
        problems.append(f"exit status {p.rc}, expected 2")
    if "Traceback" in p.err:
        problems.append(f"a traceback on stderr ({p.err.count('Traceback')})")
    if len(lines) != 1 or not lines[0].startswith("error:"):
        problems.append(f"stderr has {len(lines)} lines, expected one `error:` line: {p.err[-300:]!r}")
    return (lines[-1] if lines else ""), problems


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(root.rglob("*")) if p.is_file()}


def _sh(*args: str) -> tuple[bool, str]:
    try:
        p = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    return p.returncode == 0, " ".join((p.stderr or p.stdout).split())


def _mount(*args: str) -> str | None:
    """Run mount(8); None on success, else why it could not."""
    if os.geteuid() != 0:
        return f"mounting needs root (running as uid {os.geteuid()})"
    ok, why = _sh("mount", *args)
    return None if ok else f"`mount {' '.join(args)}` failed: {why or 'no reason given'}"


def _umount(path: Path) -> None:
    ok, _ = _sh("umount", str(path))
    if not ok:
        _sh("umount", "-l", str(path))


# --- the cases ------------------------------------------------------------------------------------------------


def reference(f: Faults) -> Result:
    t0 = time.perf_counter()
    p = f.run(f.command(f.work / "ref", "ref", **{"wandb.mode": "disabled"}))
    if p.rc != 0:
        raise SystemExit(f"the uninterrupted reference run failed (exit {p.rc}):\n{p.out[-2000:]}\n{p.err[-2000:]}")
    f.reference = read_metrics(f.work / "ref" / "ref" / "metrics.jsonl")
    last = [r for r in f.reference if "eval_loss" in r][-1]
    return Result("reference", "pass", f"{f.steps} steps uninterrupted, final eval loss {last['eval_loss']:.4f}",
                  time.perf_counter() - t0)


def kills(f: Faults, n_kills: int, rng: random.Random) -> Result:
    t0 = time.perf_counter()
    out = f.work / "kills"
    run_dir = out / "kills"
    ckpt_dir = run_dir / "checkpoints"
    cmd = f.command(out, "kills", **{"train.ckpt_every": 2, "wandb.mode": "offline"})
    problems, log, in_save = [], [], 0

    for i in range(n_kills):
        resume_step = _max_step(run_dir)
        stale = _tmp_dirs(ckpt_dir)  # left by an earlier kill: not a save of this process
        p = f.start(cmd, f"kill{i}")
        if i % 2 == 0:  # wait for a save of this process with a checkpoint before it, then land somewhere in it
            _wait(lambda: p.poll() is not None or bool(_tmp_dirs(ckpt_dir) - stale) and bool(_checkpoints(ckpt_dir)),
                  timeout=240)
            time.sleep(rng.uniform(0.0, 0.06))
            how = "in a save"
        elif i % 4 == 1:  # anywhere from start-up (imports, compile, restore) to the first steps
            delay = rng.uniform(0.5, 6.0)
            _wait(lambda: p.poll() is not None, timeout=delay, interval=0.01)
            how = f"{delay:.2f} s after start"
        else:  # while training: between saves or in one
            _wait(lambda: p.poll() is not None or _max_step(run_dir) > resume_step, timeout=240, interval=0.01)
            delay = rng.uniform(0.0, 2.0)
            _wait(lambda: p.poll() is not None, timeout=delay, interval=0.01)
            how = f"{delay:.2f} s into training"
        if p.poll() is not None:
            problems.append(f"kill {i + 1}: the run exited ({p.returncode}) before it could be killed")
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        at = _max_step(run_dir)
        saving = bool(_tmp_dirs(ckpt_dir) - stale)
        in_save += saving
        phase = "during a save" if saving else ("before training resumed" if at <= resume_step else "between saves")
        log.append(f"{how}: step {at}, {phase}")
    final = f.run(cmd)
    if final.rc != 0:
        problems.append(f"the final resume exited {final.rc}: {final.err[-300:]!r}")
    elif n_kills and "resuming" not in final.out and "from step 0" not in final.out:
        problems.append("the final run neither resumed nor started again")
    problems += f.compare(run_dir)
    wb, n_files = _wandb_problems(run_dir)
    problems += wb
    if n_kills >= 2 and in_save == 0:
        problems.append("no kill landed during a save")
    left = _tmp_dirs(ckpt_dir)
    if left:
        problems.append(f"orbax temporary directories left at the end: {sorted(n for n, _ in left)}")
    details = (f"{len(log)} kills ({in_save} during a save); the same command each time"
               + f"; metrics.jsonl equals the uninterrupted run at all {f.steps} steps; {n_files} W&B offline files "
                 f"hold every logged value")
    if problems:
        details = "; ".join(problems)
    return Result("kills", "FAIL" if problems else "pass", details + ". Kills: " + "; ".join(log),
                  time.perf_counter() - t0)


def full_disk(f: Faults) -> Result:
    t0 = time.perf_counter()
    mnt = f.work / "tmpfs"
    mnt.mkdir()
    why = _mount("-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "tmpfs", str(mnt))
    if why:
        return Result("full_disk", "skipped", why, time.perf_counter() - t0)
    try:
        st = os.statvfs(mnt)
        ballast = mnt / "ballast"
        with open(ballast, "wb") as fh:
            fh.write(b"\0" * (st.f_bavail * st.f_frsize - FREE_BYTES))
        run_dir = mnt / "full"
        cmd = f.command(mnt, "full", **{"train.ckpt_every": 2, "wandb.mode": "offline"})
        failed = f.run(cmd)
        line, problems = _error_line(failed)
        if "ENOSPC" not in line:
            problems.append(f"the error does not say ENOSPC: {line!r}")
        left = _tmp_dirs(run_dir / "checkpoints")
        if left:
            problems.append(f"orbax temporary directories left: {sorted(n for n, _ in left)}")
        kept = _checkpoints(run_dir / "checkpoints")
        ballast.unlink()
        resumed = f.run(cmd)
        if resumed.rc != 0:
            problems.append(f"after freeing space the run exited {resumed.rc}: {resumed.err[-300:]!r}")
        elif "resuming" not in resumed.out:
            problems.append("after freeing space the run did not resume")
        problems += f.compare(run_dir)
        wb, _ = _wandb_problems(run_dir)
        problems += wb
    finally:
        _umount(mnt)
    return Result.judged("full_disk", problems, (
        f"{TMPFS_MB} MB tmpfs with {FREE_BYTES / 1e6:.2f} MB free: exit 2 after step {max(kept, default=0)}'s "
        f"checkpoint (kept: {kept}), stderr one line: `{line}`; no orbax temporary directory left; space freed, "
        f"the run resumed and matches the uninterrupted run at all {f.steps} steps, W&B too"), t0)


def two_writers(f: Faults) -> Result:
    t0 = time.perf_counter()
    out = f.work / "writers"
    run_dir = out / "writers"
    cmd = f.command(out, "writers", **{"train.ckpt_every": 2})
    first = f.start(cmd, "first_writer")
    problems = []
    try:
        if not _wait(lambda: first.poll() is not None or _max_step(run_dir) >= 3, timeout=240, interval=0.01) \
                or first.poll() is not None:
            return Result("two_writers", "FAIL", f"the first run ended ({first.poll()}) before a second could start",
                          time.perf_counter() - t0)
        first.send_signal(signal.SIGSTOP)
        before = _snapshot(run_dir)
        second = f.run(cmd, timeout=120)
        after = _snapshot(run_dir)
        line, problems = _error_line(second)
        if f"pid {first.pid}" not in line:
            problems.append(f"the message does not name pid {first.pid}: {line!r}")
        if "step " in second.out:
            problems.append("the second run trained")
        if after != before:
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            problems.append(f"the second run changed the first one's files: {changed}")
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
    rc = first.wait(timeout=300)
    if rc != 0:
        problems.append(f"the first run exited {rc}")
    problems += f.compare(run_dir)
    return Result.judged("two_writers", problems, (
        f"second `attnlab train` refused in {second.seconds:.1f} s (Python and JAX start-up included), exit 2: "
        f"`{line}`; the first run's files unchanged byte for byte, and it finished matching the uninterrupted run"),
        t0)


def _read_only_method(scratch: Path, mounts: bool) -> tuple[str | None, str]:
    """How this process can make a directory read-only: ("mount", ...) with a read-only bind mount (root),
    ("chmod", ...) where chmod a-w refuses writes (not root, or root without CAP_DAC_OVERRIDE), or (None, why
    neither works). Tried on an empty `scratch` directory."""
    scratch.mkdir()
    reasons = []
    if mounts and os.geteuid() == 0:
        target = scratch.with_name(scratch.name + "_ro")
        target.mkdir()
        why = _mount("--bind", str(scratch), str(target)) or _mount("-o", "remount,bind,ro", str(target))
        _umount(target)
        if why is None:
            return "mount", "read-only bind mount"
        reasons.append(why)
    elif not mounts:
        reasons.append("--no-mounts")
    _sh("chmod", "a-w", str(scratch))
    try:
        (scratch / "probe").write_text("")
        reasons.append("chmod a-w does not stop this user (root)")
    except PermissionError:
        return "chmod", "chmod -R a-w"
    finally:
        _sh("chmod", "u+w", str(scratch))
    return None, "; ".join(reasons)


def read_only(f: Faults, mounts: bool) -> Result:
    t0 = time.perf_counter()
    method, how = _read_only_method(f.work / "ro_probe", mounts)
    if method is None:
        return Result("read_only", "skipped", how, time.perf_counter() - t0)
    src = f.work / "rw"
    run_dir = src / "ro"
    cmd = f.command(src, "ro", **{"train.ckpt_every": 2})
    p = f.start(cmd, "read_only_first")
    _wait(lambda: p.poll() is not None or _max_step(run_dir) >= 5, timeout=240, interval=0.01)
    p.send_signal(signal.SIGTERM)  # finish the step, save, exit 0
    if p.wait(timeout=120) != 0:
        return Result("read_only", "FAIL", f"the first segment exited {p.returncode} on SIGTERM",
                      time.perf_counter() - t0)
    stopped = _max_step(run_dir)
    if method == "mount":
        ro = f.work / "ro_mount"
        ro.mkdir()
        why = _mount("--bind", str(src), str(ro)) or _mount("-o", "remount,bind,ro", str(ro))
        if why:
            _umount(ro)
            return Result("read_only", "FAIL", why, time.perf_counter() - t0)
        expect = "EROFS"
        restore = lambda: _umount(ro)  # noqa: E731
    else:
        ro = src
        _sh("chmod", "-R", "a-w", str(src))
        expect = "EACCES"
        restore = lambda: _sh("chmod", "-R", "u+w", str(src))  # noqa: E731
    problems = []
    try:
        before = _snapshot(src)
        resume = f.run(f.command(ro, "ro", **{"train.ckpt_every": 2}))
        line, problems = _error_line(resume)
        if str(ro / "ro") not in line or expect not in line:
            problems.append(f"the error does not name {ro / 'ro'} and {expect}: {line!r}")
        fresh = f.run(f.command(ro, "fresh"))
        fresh_line, fresh_problems = _error_line(fresh)
        problems += [f"fresh run: {x}" for x in fresh_problems]
        if str(ro / "fresh") not in fresh_line:
            problems.append(f"the fresh run's error does not name {ro / 'fresh'}: {fresh_line!r}")
        if _snapshot(src) != before:
            problems.append("files of the read-only run directory changed")
    finally:
        restore()
    again = f.run(cmd)
    if again.rc != 0 or "resuming" not in again.out:
        problems.append(f"made writable again, the run exited {again.rc} (resumed: {'resuming' in again.out})")
    problems += f.compare(run_dir)
    return Result.judged("read_only", problems, (
        f"{how}; resuming at step {stopped}: exit 2, `{line}`; a fresh run under it: exit 2, `{fresh_line}`; "
        f"nothing changed; writable again, it resumed and matches the uninterrupted run"), t0)


# --- report ---------------------------------------------------------------------------------------------------


def _machine() -> str:
    cpu = cpu_model()
    versions = ", ".join(f"{name} {_version(name)}" for name in ("jax", "orbax-checkpoint", "tensorstore", "wandb"))
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; Python "
            f"{platform.python_version()}, {versions}; {datetime.date.today().isoformat()}")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def table(results: list[Result]) -> str:
    rows = ["| case | result | seconds | details |", "|---|---|---|---|"]
    for r in results:
        details = " ".join(r.details.replace("|", "/").split())
        rows.append(f"| {r.case} | {r.status} | {r.seconds:.0f} | {details} |")
    return "\n".join(rows)


def report(results: list[Result], args: argparse.Namespace, total_s: float) -> str:
    command = "python -m experiments.faults.run_faults " + " ".join(sys.argv[1:])
    return (f"# Fault injection\n\nCommand: `{command.strip()}`\n\nMachine: {_machine()}.\n\n"
            f"Run: {CONFIG} with tests/lm/conftest.py `tiny_overrides` (about 60K parameters, seq 32, batch 4), "
            f"{args.steps} steps, a byte-level token store of about 1.5 MB of the standard library, on the CPU; "
            f"seed {args.seed} for the kill times; {total_s:.0f} s in all. Each case runs `python -m lm.cli train` "
            f"in subprocesses and compares with an uninterrupted run of the same config (equal values, not "
            f"approximately equal). The cases are described in experiments/faults/run_faults.py; $TMP is its "
            f"temporary directory.\n\n"
            f"{table(results)}\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=10, help="SIGKILLs in the kill case (default 10)")
    ap.add_argument("--steps", type=int, default=120, help="train.steps of every run (default 120)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random kill times")
    ap.add_argument("--no-mounts", action="store_true", help="skip the cases that mount a file system")
    ap.add_argument("--write", default=str(RESULTS), metavar="FILE.md", help="results file ('none': do not write)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (its path is printed)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="attnlab-faults-"))
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    results: list[Result] = []
    try:
        f = Faults(work, args.steps, log)
        cases = [("reference", lambda: reference(f)),
                 ("kills", lambda: kills(f, args.kills, random.Random(args.seed))),
                 ("two_writers", lambda: two_writers(f)),
                 ("full_disk", (lambda: Result("full_disk", "skipped", "--no-mounts", 0.0)) if args.no_mounts
                  else (lambda: full_disk(f))),
                 ("read_only", lambda: read_only(f, not args.no_mounts))]
        for name, case in cases:
            log(f"{name} ...")
            res = case()
            log(f"{name}: {res.status} ({res.seconds:.0f} s): {res.details}")
            results.append(res)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t0
    for r in results:  # the temporary directory's random name says nothing
        r.details = r.details.replace(str(work), "$TMP")
    print()
    print(table(results))
    if args.write.lower() != "none":
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(report(results, args, total))
        print(f"\nwrote {args.write}")
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
