"""The run directory `run.out_dir/run.name`: what a checkpoint records about its run, whether a config may resume
it, reading back a trained run, and starting a new run from another run's parameters.

Layout: config.yaml (the resolved config), metrics.jsonl (one JSON object per logged step), checkpoints/
(params, optimizer state, step, data iterator, RNG, W&B id), wandb/ (W&B files), the eval heatmap PNGs, and
.lock, held by the one process that trains in the directory. A run directory at a URL (run.out_dir gs://...) has
its checkpoints there and the rest in a local mirror that is copied up (lm/storage.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import pydantic

from lm import storage
from lm.checkpoint import Checkpointer
from lm.config import Config, load_config
from lm.model import Params
from lm.optim import lr_schedule
from lm.train.setup import Setup, build, open_data


class RunError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    status: str  # "finished" | "interrupted" | "diverged" | "already_finished"
    step: int
    last_eval: dict | None
    message: str = ""


def run_url(cfg: Config) -> str:
    """Where the run directory is: a local path, or a URL (gs://...) for object storage (lm/storage.py)."""
    return storage.join(cfg.run.out_dir, cfg.run.name)


def run_dir_of(cfg: Config) -> Path:
    """The local directory the run's files are written in: the run directory itself, or its mirror when the run
    directory is a URL."""
    url = run_url(cfg)
    return storage.mirror_of(url) if storage.is_remote(url) else Path(url)


def checkpoint_dir(cfg: Config) -> str:
    """The run's checkpoints: always in the run directory itself, a URL included (orbax writes there directly)."""
    return storage.join(run_url(cfg), "checkpoints")


def run_storage(cfg: Config) -> storage.RunStorage | None:
    """The mirror of a run directory on object storage, None for a local one."""
    url = run_url(cfg)
    return storage.RunStorage(url) if storage.is_remote(url) else None


LOCK = ".lock"


@contextlib.contextmanager
def exclusive(run_dir: Path):
    """Hold the run directory's lock for the block: one writer per run directory. The lock is an flock on
    `run_dir/.lock`, so the kernel releases it when its holder exits in any way (a kill -9 included); the file
    keeps the holder's pid and start time for the message a second writer gets. A directory this call created
    is removed again if nothing but the lock was written to it (a run that failed before it began)."""
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise RunError(f"{run_dir} is in use by {holder}; wait for it to finish (or stop it), or train under "
                           f"another run.name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} (attnlab train, started {datetime.datetime.now():%Y-%m-%d %H:%M:%S})"
                  .encode(), 0)
        yield
    finally:
        if created and os.listdir(run_dir) == [LOCK]:
            os.unlink(run_dir / LOCK)
            run_dir.rmdir()
        os.close(fd)  # closing the descriptor releases the flock


@contextlib.contextmanager
def run_lock(run_dir: Path, shared: bool = True):
    """`exclusive(run_dir)` held by process 0 for the block; the other processes of a multi-process run wait for
    it and stop with a RunError when process 0 could not take it (its own output says why). With `shared` (the run
    directory is not a URL, whose checkpoints every host writes to directly), every process must see the directory
    process 0 writes to, else checkpoints would be split over the hosts' disks."""
    from lm.distributed import from_primary

    if jax.process_count() == 1:
        with exclusive(run_dir):
            yield
        return
    if jax.process_index() != 0:
        nonce = from_primary(0)
        if not nonce:
            raise RunError(f"process 0 could not take the lock of {run_dir} (its output says why)")
        if shared:
            _check_shared(run_dir, nonce)
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive(run_dir))
        except BaseException:
            from_primary(0)
            raise
        nonce = int.from_bytes(os.urandom(3), "big") + 1
        (run_dir / SHARED).write_text(str(nonce))
        from_primary(nonce)
        if shared:
            _check_shared(run_dir, nonce)
        yield


SHARED = ".shared"  # process 0's token in a multi-process run's directory, which every process must read back


def _check_shared(run_dir: Path, nonce: int) -> None:
    """RunError on every process unless each one reads process 0's token in `run_dir` (a shared file system)."""
    from lm.distributed import agree

    try:
        seen = int((run_dir / SHARED).read_text())
    except (OSError, ValueError):
        seen = None
    blind = agree(jax.process_index() + 1 if seen != nonce else 0)
    if blind:
        raise RunError(f"run.out_dir {run_dir.parent} is not shared by the hosts of this run (process {blind - 1} "
                       f"does not see what process 0 writes there), so checkpoints would be split over their disks; "
                       f"put it on a file system every host mounts, or on object storage (gs://bucket/runs)")


@contextlib.contextmanager
def library_logs(run_dir: Path, names: tuple[str, ...] = ("absl", "orbax", "jax._src.distributed", "gcsfs", "fsspec")):
    """Send what the libraries log (orbax's warnings and errors through absl, retries, tracebacks) to
    run_dir/logs/libraries.log instead of the console, for the block: the run's own lines say what happened
    and where; the details are in the file."""
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    name = "libraries.log" if jax.process_index() == 0 else f"libraries.process{jax.process_index()}.log"
    handler = logging.FileHandler(logs / name, delay=True)  # no file until something is logged
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg.propagate, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, (propagate, level) in zip(loggers, saved):
            lg.removeHandler(handler)
            lg.propagate, lg.level = propagate, level
        handler.close()
        try:
            if not any(logs.iterdir()):
                logs.rmdir()
        except OSError:  # another process of the run removed it first, or wrote to it meanwhile
            pass


def history(run_dir: Path, remote: storage.RunStorage | None = None) -> tuple[list[str], bool]:
    """What a run directory holds from earlier training besides usable checkpoints (logged metrics, corrupt
    checkpoints), and whether a fresh start would lose trained progress: only corrupt checkpoints mean that.
    Metrics alone (a run killed before its first save) are steps that a fresh start computes again. `remote`:
    the run directory is a URL, whose corrupt checkpoints are there, not in the mirror `run_dir`."""
    found = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        lines = sum(1 for ln in metrics.read_text().splitlines() if ln.strip())
        found.append(f"metrics.jsonl with {lines} records")
    corrupt = run_dir / "checkpoints_corrupt"
    n_corrupt = len(remote.listdir("checkpoints_corrupt")) if remote else \
        len(list(corrupt.iterdir())) if corrupt.is_dir() else 0
    if n_corrupt:
        found.append(f"{n_corrupt} unusable checkpoint(s) in checkpoints_corrupt/")
    return found, bool(n_corrupt)


def set_aside_history(run_dir: Path) -> Path | None:
    """Before a fresh start over history: move metrics.jsonl to metrics.<time>.jsonl (kept, never deleted)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file() or jax.process_index() != 0:
        return None
    dst = run_dir / f"metrics.{datetime.datetime.now():%Y%m%d-%H%M%S}.jsonl"
    metrics.rename(dst)
    return dst


def checkpoint_meta(cfg: Config, step: int, run_id: str) -> dict:
    """The JSON saved beside each checkpoint's arrays; `config` is what `check_same_run` compares on resume."""
    return {"step": step, "seed": cfg.run.seed, "rng_key": [int(x) for x in np.asarray(
        jax.random.key_data(jax.random.PRNGKey(cfg.run.seed)))], "wandb_id": run_id, "config": cfg.to_dict()}


# The data itself is compared through its identity (data.json), not through data.source's spelling.
_RESUME_KEYS = ("model", "data.seq_len", "data.packed")
DATA_FILE = "data.json"


def record_data(run_dir: Path, identity: dict) -> None:
    """Write what identifies the run's data and tokenizer to run_dir/data.json (atomically)."""
    tmp = run_dir / (DATA_FILE + ".tmp")
    tmp.write_text(json.dumps(identity, indent=1))
    tmp.replace(run_dir / DATA_FILE)


def check_data(run_dir: Path, identity: dict) -> None:
    """Raise RunError if the data the run would read now is not the data it trained on (a token store prepared
    again with another tokenizer or corpus, another synthetic task): scores and samples would be silently wrong.
    Runs made before data.json existed are not checked."""
    path = run_dir / DATA_FILE
    if not path.is_file():
        return
    was = json.loads(path.read_text())
    keys = ("kind", "fingerprint", "tokenizer_fingerprint", "task", "settings", "vocab_size")
    changed = [k for k in keys if was.get(k) != identity.get(k)]
    if changed:
        def show(d):
            return (f"token store {d.get('path')} (tokenizer {d.get('tokenizer')}, fingerprint "
                    f"{str(d.get('fingerprint'))[:12]})" if d.get("kind") == "token_store"
                    else f"synthetic:{d.get('task')} {d.get('settings')}")
        raise RunError(f"{run_dir} was trained on {show(was)}, but the data it would read now is {show(identity)} "
                       f"({', '.join(changed)} differ); prepare the store again as it was, or point data.source at "
                       f"the data the run used")


def check_same_run(run_dir: Path, meta: dict, cfg: Config) -> None:
    """Raise RunError if the checkpoint whose `meta` this is belongs to a run `cfg` cannot continue."""
    problem = _config_mismatch(meta.get("config", {}), cfg)
    if problem:
        raise RunError(f"{run_dir} holds checkpoints of a different run ({problem}); "
                       f"use a new run.name or remove {run_dir}")


def _config_mismatch(saved: dict, cfg: Config) -> str | None:
    """The first setting that makes a checkpoint's run differ from `cfg`, or None.

    The saved config is re-validated first, so keys added to attnlab since (with their defaults) do not
    count as differences.
    """
    try:
        saved = Config.model_validate(saved).to_dict()
    except pydantic.ValidationError as e:
        return f"its saved config is not valid for this version: {str(e).splitlines()[1:3]}"
    now = cfg.to_dict()
    for key in _RESUME_KEYS:
        a, b = saved, now
        for part in key.split("."):
            a, b = (a or {}).get(part), (b or {}).get(part)
        diff = _first_difference(a, b, key)
        if diff:
            return diff
    return None


def config_changes(saved: dict, cfg: Config, sections: tuple[str, ...] = ("optim", "train", "data")) -> list[str]:
    """Settings a resumed run changes against its checkpoint's config, as 'key: old -> new' (the schedule, the
    run length and batch follow the new values from the resumed step on)."""
    try:
        saved = Config.model_validate(saved).to_dict()
    except pydantic.ValidationError:
        return []
    now = cfg.to_dict()

    def flat(d, prefix):
        out = {}
        for k, v in (d or {}).items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    old = {k: v for sec in sections for k, v in flat(saved.get(sec), f"{sec}.").items()}
    new = {k: v for sec in sections for k, v in flat(now.get(sec), f"{sec}.").items()}
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k not in ("data.source", "data.tokenizer")]


def schedule_change(saved: dict, cfg: Config, step: int) -> str | None:
    """When a resumed run's new train.steps (or optim settings) move its learning-rate schedule: what the rate at
    the resumed step was under the checkpoint's settings and what it is now, else None."""
    try:
        old = Config.model_validate(saved)
    except pydantic.ValidationError:
        return None
    was = float(lr_schedule(old.optim, old.train.steps)(step))
    now = float(lr_schedule(cfg.optim, cfg.train.steps)(step))
    if math.isclose(was, now, rel_tol=1e-6):
        return None
    why = (f"train.steps {old.train.steps} -> {cfg.train.steps} spreads it over the new length"
           if old.train.steps != cfg.train.steps else "the optim settings changed")
    return (f"the learning-rate schedule ({cfg.optim.schedule}) is recomputed: {why}, so the learning rate at step "
            f"{step} goes from {was:.3g} to {now:.3g} ({'up' if now > was else 'down'} "
            f"{max(now, was) / max(min(now, was), 1e-30):.2f}x)")


def _first_difference(a: Any, b: Any, where: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(k), b.get(k), f"{where}.{k}")
            if diff:
                return diff
        return None
    return None if a == b else f"{where}: checkpoint has {a!r}, config has {b!r}"


def open_run_data(run_dir: Path, cfg: Config, log: Callable[[str], None]):
    """The dataset a trained run reads, checked to be the data it trained on (see `check_data`)."""
    return open_data(cfg, log, check=lambda ds: check_data(run_dir, ds.identity()))


def local_run_dir(run_dir: str | Path) -> Path:
    """A trained run's files on this machine: the directory itself, or for a URL its mirror, filled from it."""
    if not storage.is_remote(run_dir):
        return Path(run_dir)
    remote = storage.RunStorage(str(run_dir))
    remote.pull()
    return remote.local


def load_run(run_dir: str | Path, overrides: list[str] = ()) -> tuple[Config, Setup, Any, int]:
    """(config, setup, params, step) of the newest usable checkpoint of a run directory (a path or a URL)."""
    local = local_run_dir(run_dir)
    checkpoints = storage.join(str(run_dir), "checkpoints")
    cfg_path = local / "config.yaml"
    if not cfg_path.exists():
        raise RunError(f"{run_dir} is not a run directory (no config.yaml); give runs/<name> of a trained run")
    cfg = load_config(cfg_path, list(overrides))
    setup = build(cfg)
    if not (storage.filesystem(checkpoints)[0].isdir(checkpoints) if storage.is_remote(checkpoints)
            else Path(checkpoints).is_dir()):
        raise RunError(f"{run_dir} has no checkpoint yet; train it first (attnlab train {cfg_path})")
    # Read-only: evaluating or sampling a run changes nothing in its directory, corrupt checkpoints included.
    ckpt = Checkpointer(checkpoints, keep=cfg.train.ckpt_keep, read_only=True,
                        warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    try:
        restored = ckpt.restore_latest(setup.abstract_state())
    finally:
        ckpt.close()
    if restored is None:
        raise RunError(f"{run_dir} has no checkpoint yet; train it first (attnlab train {cfg_path})")
    step, state, _, _ = restored
    return cfg, setup, state["params"], step


def params_from_run(params: Params, run_dir: str | Path, say: Callable[[str], None]) -> Params:
    """`params` with every array whose path and shape match one in `run_dir`'s newest checkpoint loaded
    from it; the rest keep their initial values. Says which were loaded and which not."""
    _, _, source, source_step = load_run(run_dir)
    source_by_path = {jax.tree_util.keystr(p, simple=True, separator="."): x
                      for p, x in jax.tree_util.tree_flatten_with_path(source)[0]}
    loaded, kept_init = [], []

    def pick(path, x):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        y = source_by_path.get(name)
        if y is not None and y.shape == x.shape and y.dtype == x.dtype:
            loaded.append(name)
            return jax.device_put(y, x.sharding)
        kept_init.append(name if y is None else f"{name} (checkpoint shape {tuple(y.shape)})")
        return x

    out = jax.tree_util.tree_map_with_path(pick, params)
    if not loaded:
        raise RunError(f"--init-from {run_dir}: no parameter of this model matches its checkpoint (step "
                       f"{source_step}) by path and shape; give a run of the same architecture")
    unused = sorted(set(source_by_path) - set(loaded))
    n_loaded = sum(int(np.prod(source_by_path[n].shape)) for n in loaded)
    say(f"init from {run_dir} step {source_step}: loaded {len(loaded)} of {len(loaded) + len(kept_init)} "
        f"parameter arrays ({n_loaded:,} values); initialised fresh: {_layer_groups(kept_init) or 'none'}; "
        f"in the checkpoint but unused: {_layer_groups(unused) or 'none'}")
    return out


def _layer_groups(names: list[str]) -> str:
    """Parameter names with the layer index folded: blocks.*.mixer.k_proj.kernel (x4)."""
    counts: dict[str, int] = {}
    for n in names:
        key = re.sub(r"^blocks\.\d+\.", "blocks.*.", n)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(k if c == 1 else f"{k} (x{c})" for k, c in counts.items())
