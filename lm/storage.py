"""Run directories and token stores on object storage (`gs://bucket/...`, or any URL fsspec knows).

Checkpoints are written to the URL directly (orbax's tensorstore speaks gs://). Everything else in a run directory
needs a file system's semantics: an exclusive lock, files appended line by line (metrics.jsonl), W&B's offline
files, log files, heatmaps. Those live in a local mirror, `$ATTNLAB_CACHE/runs/<scheme>/<bucket>/<path>` (default
~/.cache/attnlab), which `RunStorage` fills from the URL when the run starts (`pull`: the top-level files, such as
metrics.jsonl, config.yaml and data.json, and W&B's ledger) and copies back (`push`) at every log line a while
after the last push, before every checkpoint (so the metrics of the steps a checkpoint holds are stored before
it), and when the run ends. A run resumed on another machine thus finds its history, its checkpoints and its
metrics up to the checkpoint it resumes from.

A token store at a URL is copied once into `$ATTNLAB_CACHE/stores/` (`local_store`) and read there: training reads
it memory-mapped. A copy is reused while its meta.json equals the URL's.

The lock in the mirror keeps two trainings on one machine apart, not two machines on one URL.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from pathlib import Path

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://")
PUSH_EVERY_S = 30.0


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (gs://bucket/dir) rather than a local path."""
    return bool(_URL.match(str(path)))


def join(base: str, *parts: str) -> str:
    """`base`/`parts` for a URL or a local path."""
    return "/".join([str(base).rstrip("/"), *parts])


def cache_dir() -> Path:
    return Path(os.environ.get("ATTNLAB_CACHE") or Path.home() / ".cache" / "attnlab")


class StorageError(RuntimeError):
    """A URL cannot be used: no file system for its scheme, or it cannot be read or written."""


def filesystem(url: str):
    """(fsspec file system, path within it) for `url`; StorageError when its scheme has no installed file system."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        scheme = url.split("://", 1)[0]
        extra = " (pip install 'attnlab[gcs]')" if scheme in ("gs", "gcs") else ""
        raise StorageError(f"{url}: no file system for {scheme}:// is installed{extra}: {e}") from None


def mirror_of(url: str) -> Path:
    """The local directory that stands for the run directory at `url`."""
    scheme, rest = url.split("://", 1)
    return cache_dir() / "runs" / scheme / rest.strip("/")


class RunStorage:
    """The run directory `url` (a URL) through its local mirror: `local` is where the run's files are written."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.local = mirror_of(self.url)
        self.fs, self.root = filesystem(self.url)
        self.pushed: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) last copied up
        self.last_push = 0.0

    def pull(self) -> None:
        """Copy the run's top-level files and W&B's ledger from the URL into the mirror (over older copies)."""
        self.local.mkdir(parents=True, exist_ok=True)
        try:
            entries = self.fs.ls(self.root, detail=True) if self.fs.exists(self.root) else []
        except OSError as e:
            raise StorageError(f"cannot read {self.url}: {e}") from None
        names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file"]
        for rel in names + (["wandb/logged_through"] if self.fs.exists(f"{self.root}/wandb/logged_through") else []):
            dst = self.local / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get(f"{self.root}/{rel}", str(dst))
            self._mark(rel)

    def push(self, *, force: bool = True) -> None:
        """Copy every file of the mirror that changed since it was last copied up (not the lock); without `force`,
        only when the last push is PUSH_EVERY_S old."""
        if not force and time.monotonic() - self.last_push < PUSH_EVERY_S:
            return
        self.last_push = time.monotonic()
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            rel = path.relative_to(self.local).as_posix()
            if rel == ".lock" or self.pushed.get(rel) == _stamp(path):
                continue
            try:
                self.fs.put_file(str(path), f"{self.root}/{rel}")
            except FileNotFoundError:  # W&B removed a temporary file meanwhile
                continue
            except OSError as e:
                raise StorageError(f"cannot write {self.url}/{rel}: {e}") from None
            self._mark(rel)

    def _mark(self, rel: str) -> None:
        path = self.local / rel
        if path.is_file():
            self.pushed[rel] = _stamp(path)

    def exists(self, rel: str) -> bool:
        return self.fs.exists(f"{self.root}/{rel}")

    def listdir(self, rel: str) -> list[str]:
        """Names in the run directory's `rel` (empty when it does not exist)."""
        where = f"{self.root}/{rel}"
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(where, detail=False)] if self.fs.exists(where) \
            else []


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def local_store(url: str, log=print) -> Path:
    """A local copy of the token store at `url` (downloaded once; again when the URL's meta.json changed)."""
    fs, root = filesystem(url)
    root = root.rstrip("/")
    try:
        meta = fs.cat_file(f"{root}/meta.json")
    except FileNotFoundError:
        raise StorageError(f"{url} is not a token store (no meta.json there): give the URL a store was copied to, "
                           f"e.g. with `gcloud storage cp -r data/NAME {url}`") from None
    dst = cache_dir() / "stores" / hashlib.sha256(url.encode()).hexdigest()[:16]
    if (dst / "meta.json").is_file() and (dst / "meta.json").read_bytes() == meta:
        return dst
    part = dst.with_name(dst.name + ".part")
    part.mkdir(parents=True, exist_ok=True)
    files = [p for p in fs.find(root) if not p.endswith("/meta.json")]
    size = sum(fs.size(p) for p in files)
    log(f"copying token store {url} ({len(files) + 1} files, {size / 1e9:.2f} GB) to {dst}")
    for p in files:
        target = part / p[len(root) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(p, str(target))
    (part / "meta.json").write_bytes(meta)  # last: a copy with meta.json is complete
    if dst.exists():
        shutil.rmtree(dst)
    part.rename(dst)
    return dst
