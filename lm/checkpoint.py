"""Checkpoints: one thin wrapper over orbax's CheckpointManager, so orbax API churn stays in this file.

A checkpoint holds three items: `state` (params, optimizer state, step counters: arrays), `meta`
(JSON: step, RNG seed/key, W&B run id, resolved config) and `data` (JSON: the data iterator state).
Orbax writes each step to a temporary directory and renames it when complete, so a killed save never
looks like a checkpoint. A save that fails (a full disk, a read-only or unwritable directory) removes that
temporary directory and raises CheckpointError naming the step, the directory, the reason and the newest
checkpoint that is still intact; orbax's own log records and its worker threads' tracebacks of the failure
are kept off the console. A checkpoint that fails to restore is moved to `checkpoints_corrupt/` (kept,
never deleted) and the previous one is used.

The directory may be a URL (gs://bucket/run/checkpoints): orbax writes there through tensorstore, and a corrupt
checkpoint is moved on the object store.

In a multi-process run every process saves and restores (each its own shards; orbax's process 0 writes the JSON
items and renames the finished step); only process 0 moves or removes directories. A restore target may be
sharded over another mesh than the one that saved: orbax reads each process's shards of the new layout.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath

from lm import storage

log = logging.getLogger(__name__)

# Orbax logs every save/restore at INFO; keep the console for the run's own messages.
logging.getLogger("absl").setLevel(logging.WARNING)


class CheckpointError(RuntimeError):
    """No usable checkpoint although some exist, or a checkpoint could not be written; the message says what
    was tried and what to do."""


# Orbax's temporary directory for a step being written: `<step>` + this suffix, renamed to `<step>` when complete.
TMP_SUFFIX = ".orbax-checkpoint-tmp"

# Storage failures a user can act on; anything else raised by a save is a bug and propagates as it is.
_STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# Tensorstore reports file-system failures as ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='28']").
_TS_ERRNO = re.compile(r"os_error_code='(\d+)'")
_TS_STATUS = {"RESOURCE_EXHAUSTED": errno.ENOSPC, "PERMISSION_DENIED": errno.EACCES}


def storage_errno(exc: BaseException) -> int | None:
    """The errno of a storage failure (`_STORAGE_ERRNOS`) behind `exc` or its causes, else None."""
    seen = 0
    while exc is not None and seen < 10:
        code = exc.errno if isinstance(exc, OSError) else None
        if code is None and isinstance(exc, ValueError):
            text = str(exc)
            found = _TS_ERRNO.search(text)
            code = int(found.group(1)) if found else next(
                (c for status, c in _TS_STATUS.items() if text.startswith(status)), None)
        if code in _STORAGE_ERRNOS:
            return code
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def describe_errno(code: int) -> str:
    """'no space left on device (ENOSPC)'"""
    return f"{_STORAGE_ERRNOS.get(code) or os.strerror(code).lower()} ({errno.errorcode.get(code, code)})"


class _AbslBuffer(logging.Filter):
    """Holds back orbax's log records while a save runs: replayed if it succeeds, dropped if it fails (the
    CheckpointError then says what happened, once)."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


def _drop_closed_loop_noise(previous):
    """An unraisable-exception hook that drops the 'Event loop is closed' RuntimeErrors tensorstore's callbacks
    raise after a failed orbax save has closed its event loop; everything else goes to `previous`."""

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook.attnlab_closed_loop_filter = True
    return hook


class _DropStorageFailures(logging.Filter):
    """asyncio's 'Task exception was never retrieved' reports of the storage failure that a failed save already
    turned into CheckpointError (orbax leaves sibling tasks unawaited; they are reported when collected)."""

    installed = False

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not ("never retrieved" in record.getMessage() and exc is not None and storage_errno(exc) is not None)


@contextlib.contextmanager
def _dropped_absl(prefix: str):
    """Drop absl log records whose message starts with `prefix`, for the block."""
    absl = logging.getLogger("absl")
    drop = lambda record: not record.getMessage().startswith(prefix)  # noqa: E731
    absl.addFilter(drop)
    try:
        yield
    finally:
        absl.removeFilter(drop)


@contextlib.contextmanager
def _quiet_failures():
    absl = logging.getLogger("absl")
    buffer = _AbslBuffer()
    absl.addFilter(buffer)
    previous_hook = sys.unraisablehook
    if not getattr(previous_hook, "attnlab_closed_loop_filter", False):
        sys.unraisablehook = _drop_closed_loop_noise(previous_hook)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        if not _DropStorageFailures.installed:
            logging.getLogger("asyncio").addFilter(_DropStorageFailures())
            _DropStorageFailures.installed = True
        raise
    finally:
        absl.removeFilter(buffer)
        if not failed:
            sys.unraisablehook = previous_hook
            for record in buffer.records:
                absl.handle(record)
        # After a failure both filters stay: the failed save's leftovers are reported when they are collected,
        # after save has returned.


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int, warn: Callable[[str], None] = print,
                 read_only: bool = False, async_save: bool = False):
        """`read_only` (eval, generate): nothing in the directory is created, written or moved; a checkpoint
        that fails to restore is skipped and left where it is. `async_save`: `save` returns once the arrays are
        copied to host memory and orbax writes them in the background; the write is awaited at the next save or
        at `close`, and a failed background write raises CheckpointError there, naming its own step."""
        # A URL (gs://...) stays one: orbax and epath write there directly.
        self.dir = epath.Path(directory) if storage.is_remote(directory) else epath.Path(Path(directory).absolute())
        self.warn = warn
        self.read_only = read_only
        self.async_save = async_save
        self.pending: int | None = None  # the step being written in the background
        # Read-only: the options orbax would otherwise adjust (and warn about on the console) are set as it wants
        # them, and its note that the directory is read-only, which the caller asked for, is dropped.
        options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep, create=not read_only,
                                               read_only=read_only, enable_async_checkpointing=async_save,
                                               **({"save_interval_steps": 0} if read_only else {}))
        with _dropped_absl("Given directory is read only"):
            self.mngr = ocp.CheckpointManager(self.dir, options=options, item_names=("state", "meta", "data"))

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def save(self, step: int, state: Any, meta: dict, data_state: dict) -> float:
        """Write checkpoint `step`; returns the seconds the caller was held (the whole write, or with `async_save`
        the wait for the previous write plus the copy to host). On a storage failure (full disk, read-only or
        unwritable directory) the partial write is removed and CheckpointError says so; the checkpoints already
        there are untouched."""
        t0 = time.perf_counter()
        self.finish()
        if step in self.mngr.all_steps():
            return time.perf_counter() - t0
        try:
            with _quiet_failures():
                self.mngr.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    meta=ocp.args.JsonSave(meta),
                    data=ocp.args.JsonSave(data_state),
                ), force=True)
                if not self.async_save:
                    self.mngr.wait_until_finished()
        except Exception as e:
            self._failed(step, e)
        if self.async_save:
            self.pending = step
        return time.perf_counter() - t0

    def finish(self) -> None:
        """Wait for a background write to complete; CheckpointError if it failed."""
        if self.pending is None:
            return
        step, self.pending = self.pending, None
        try:
            with _quiet_failures():
                self.mngr.wait_until_finished()
        except Exception as e:
            self._failed(step, e)

    def _failed(self, step: int, e: Exception):
        """Remove what the failed write of `step` left and raise CheckpointError for a storage failure (any other
        exception is a bug and propagates as it is)."""
        leftover = self._discard_partial(step)
        code = storage_errno(e)
        if code is None:
            raise e
        previous = [s for s in self.steps() if s != step]
        intact = (f"the previous checkpoint (step {previous[-1]}) is intact" if previous
                  else "there is no earlier checkpoint of this run")
        advice = "free space and resume" if code in (errno.ENOSPC, errno.EDQUOT) else \
            "make the directory writable (or train under another run.out_dir) and resume"
        raise CheckpointError(f"could not write checkpoint step {step} to {self.dir}: {describe_errno(code)}; "
                              f"{advice} — {intact}"
                              + (f" (could not remove the partial write {leftover})" if leftover else "")) from e

    def _discard_partial(self, step: int) -> epath.Path | None:
        """Remove what a failed save of `step` left (orbax's temporary directory); the leftover path if that
        failed too."""
        leftover = None
        for tmp in (self.dir.glob(f"{step}{TMP_SUFFIX}*") if jax.process_index() == 0 else ()):
            try:
                tmp.rmtree()
            except OSError:
                pass
            if tmp.exists():
                leftover = tmp
        try:
            self.mngr.reload()
        except Exception:  # the manager re-reads the directory; a failure here must not hide the save's error
            pass
        return leftover

    def restore_latest(self, abstract_state: Any, check_meta: Callable[[dict], None] | None = None
                       ) -> tuple[int, Any, dict, dict] | None:
        """(step, state, meta, data_state) from the newest checkpoint that restores, or None if there is none.

        `check_meta(meta)` runs before the arrays are read and may raise to refuse the checkpoint (for
        example when it belongs to a different model); such a refusal propagates and moves nothing.
        """
        steps = self.steps()
        for step in reversed(steps):
            meta = self._read_meta(step)
            if meta is not None and check_meta is not None:
                check_meta(meta)
            try:
                got = self.mngr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    meta=ocp.args.JsonRestore(),
                    data=ocp.args.JsonRestore(),
                ))
                return step, got["state"], dict(got["meta"]), dict(got["data"])
            except Exception as e:  # any failure to read this step means it is unusable: fall back
                where = "left it in place" if self.read_only else f"moved it to {self._quarantine(step)}"
                self.warn(f"checkpoint step {step} could not be restored ({type(e).__name__}: {_first_line(e)}); "
                          f"{where} and trying the previous one")
        if steps:
            where = "left in place" if self.read_only else f"moved to {self.dir.parent / 'checkpoints_corrupt'}"
            raise CheckpointError(f"none of the checkpoints in {self.dir} (steps {steps}) could be restored; "
                                  f"they were {where}")
        return None

    def _read_meta(self, step: int) -> dict | None:
        try:
            return dict(self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        except Exception:  # unreadable metadata: the full restore below reports and quarantines it
            return None

    def _quarantine(self, step: int) -> epath.Path:
        src = self.dir / str(step)
        dst_root = self.dir.parent / "checkpoints_corrupt"
        dst_root.mkdir(exist_ok=True)
        dst = dst_root / f"{step}-{int(time.time())}"
        if src.exists() and jax.process_index() == 0:  # one mover in a multi-process run
            if storage.is_remote(str(src)):
                fs, path = storage.filesystem(str(src))
                fs.mv(path, storage.filesystem(str(dst))[1], recursive=True)
            else:
                shutil.move(str(src), str(dst))
        self.mngr.reload()
        return dst

    def close(self) -> None:
        """Wait for a background write (CheckpointError if it failed; the manager is closed either way)."""
        try:
            self.finish()
            self.mngr.wait_until_finished()
        finally:
            self.mngr.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def abstract_of(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing live arrays, as a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
