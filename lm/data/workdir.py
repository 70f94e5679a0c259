"""Where a token store is built before it exists: `.NAME.prepare/` beside its path.

    plan.json             what is being prepared (the request) and in how many parts; every part must agree
    part-PPPPP.lock       held (flock) by the process preparing part P; a second one waits for it
    combine.lock          held while the finished parts become the store
    part-PPPPP/           the part's own state: scan.json (the split's cuts), tokenizer.json, done.json
    records/              one record per finished shard (lm/data/shards.py)
    store/                the shards; at the end tokenizer.json and meta.json, then it is renamed to NAME

Nothing here is ever read as a store: only the rename, after meta.json is written, makes one appear at NAME. So
a kill at any moment leaves NAME as it was and the finished shards here; the same command continues from them.
Parts prepared on several machines share this directory (a shared file system), or are copied into one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import shutil
from pathlib import Path

from lm.data.errors import DataError
from lm.data.shards import shard_name


class WorkDir:
    def __init__(self, out: Path):
        self.out = out
        self.path = out.parent / f".{out.name}.prepare"
        self.store = self.path / "store"
        self.records = self.path / "records"

    def part_dir(self, part: int) -> Path:
        return self.path / f"part-{part:05d}"

    def exists(self) -> bool:
        return self.path.is_dir()

    def plan(self) -> dict | None:
        try:
            return json.loads((self.path / "plan.json").read_text())
        except (OSError, ValueError):
            return None

    def start(self, plan: dict, write, log) -> None:
        """Create the directory for `plan`, or join the same plan. An unfinished one-part preparation of something
        else is removed (saying so); parts of something else are refused (DataError), since other machines may
        still be writing them."""
        old = self.plan()
        if old is not None and old != plan:
            if old["num_parts"] > 1 or plan["num_parts"] > 1:
                raise DataError(
                    f"{self.path} holds parts of another preparation of {self.out} ({_describe(old, plan)}); run "
                    f"every part with the same --source, --tokenizer, --val-fraction/--val-source and --num-parts, "
                    f"or remove {self.path} to start over")
            why = f"it held an unfinished preparation of another corpus or tokenizer ({_describe(old, plan)})"
            self.discard(why)
            log(f"removed {self.path}: {why}")
            old = None
        if old is None:
            self.path.mkdir(parents=True, exist_ok=True)
            write(self.path / "plan.json", json.dumps(plan, indent=1).encode())

    def discard(self, why: str) -> None:
        """Remove the whole directory, unless a process holds one of its locks."""
        for lock in sorted(self.path.glob("*.lock")):
            with open(lock, "a") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.EACCES):
                        raise DataError(f"{self.path} is being written by another prepare ({lock.name} is held), "
                                        f"and {why}; wait for it or choose another --out") from None
                    raise
        shutil.rmtree(self.path, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, name: str, log):
        """Hold `name`.lock; wait (saying so) while another process holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / f"{name}.lock", "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                log(f"waiting: another process is preparing {self.out} ({self.path / (name + '.lock')})")
                fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def finished_shards(self, part: int) -> list[dict]:
        """The records of the part's finished shards, in order; the files of any later (unfinished) shard of the
        part are removed, so writing continues after the last record."""
        records = []
        while True:
            file = self.records / f"{shard_name(part, len(records))}.json"
            try:
                records.append(json.loads(file.read_text()))
            except FileNotFoundError:
                break
        kept = {shard_name(part, i) for i in range(len(records))}
        prefix = f"{part:05d}-"
        for directory in (self.store / "train", self.store / "val", self.records):
            if directory.is_dir():
                for f in directory.iterdir():
                    if f.name.startswith(prefix) and f.name[:11] not in kept:
                        f.unlink()
        return records

    def done(self, part: int) -> dict | None:
        try:
            return json.loads((self.part_dir(part) / "done.json").read_text())
        except (OSError, ValueError):
            return None

    def mark_done(self, part: int, summary: dict, write) -> None:
        write(self.part_dir(part) / "done.json", json.dumps(summary, indent=1).encode())

    def remove_part(self, part: int) -> None:
        """Forget a part (its shards, records and state); the directory goes too when nothing else is in it."""
        shutil.rmtree(self.part_dir(part), ignore_errors=True)
        prefix = f"{part:05d}-"
        for directory in (self.store / "train", self.store / "val", self.records):
            if directory.is_dir():
                for f in directory.iterdir():
                    if f.name.startswith(prefix):
                        f.unlink()
        if not any(p.is_dir() and p.name.startswith("part-") for p in self.path.iterdir()):
            shutil.rmtree(self.path, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _describe(old: dict, new: dict) -> str:
    """What differs between two plans, for the message that refuses one."""
    differ = [f"{key} {_short(old['request'].get(key))} there, {_short(new['request'].get(key))} here"
              for key in sorted(set(old["request"]) | set(new["request"]))
              if old["request"].get(key) != new["request"].get(key)]
    if old["num_parts"] != new["num_parts"]:
        differ.append(f"num_parts {old['num_parts']} there, {new['num_parts']} here")
    return "; ".join(differ)


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 24 else text[:12] + "..."
