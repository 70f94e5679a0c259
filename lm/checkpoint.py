"""Checkpoints: one thin wrapper over orbax's CheckpointManager, so orbax API churn stays in this file.

A checkpoint holds three items: `state` (params, optimizer state, step counters: arrays), `meta`
(JSON: step, RNG seed/key, W&B run id, resolved config) and `data` (JSON: the data iterator state).
Orbax writes each step to a temporary directory and renames it when complete, so a killed save never
looks like a checkpoint. A checkpoint that fails to restore is moved to `checkpoints_corrupt/` (kept,
never deleted) and the previous one is used.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

# Orbax logs every save/restore at INFO; keep the console for the run's own messages.
logging.getLogger("absl").setLevel(logging.WARNING)


class CheckpointError(RuntimeError):
    """No usable checkpoint although some exist; the message says what was tried."""


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int, warn: Callable[[str], None] = print):
        self.dir = Path(directory).absolute()
        self.warn = warn
        self.mngr = ocp.CheckpointManager(
            self.dir,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
            item_names=("state", "meta", "data"),
        )

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def save(self, step: int, state: Any, meta: dict, data_state: dict) -> None:
        if step in self.mngr.all_steps():
            return
        self.mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta),
            data=ocp.args.JsonSave(data_state),
        ), force=True)
        self.mngr.wait_until_finished()

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
                moved = self._quarantine(step)
                self.warn(f"checkpoint step {step} could not be restored ({type(e).__name__}: {_first_line(e)}); "
                          f"moved it to {moved} and trying the previous one")
        if steps:
            raise CheckpointError(f"none of the checkpoints in {self.dir} (steps {steps}) could be restored; "
                                  f"they were moved to {self.dir.parent / 'checkpoints_corrupt'}")
        return None

    def _read_meta(self, step: int) -> dict | None:
        try:
            return dict(self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        except Exception:  # unreadable metadata: the full restore below reports and quarantines it
            return None

    def _quarantine(self, step: int) -> Path:
        src = self.dir / str(step)
        dst_root = self.dir.parent / "checkpoints_corrupt"
        dst_root.mkdir(exist_ok=True)
        dst = dst_root / f"{step}-{int(time.time())}"
        if src.exists():
            shutil.move(str(src), dst)
        self.mngr.reload()
        return dst

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def abstract_of(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing live arrays, as a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
