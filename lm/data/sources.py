"""Corpora: which files a source spec names, and their fingerprint.

A source spec is "stdlib" (the running Python's standard-library sources) or one path, directory
or glob, or a list of them, naming `.txt` files (one document each), `.jsonl` files (a "text"
field per line, also compressed as `.jsonl.gz` or `.jsonl.zst`) and `.parquet` files (a "text" column).
lm/data/readers.py streams the documents out of each kind of file.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from lm.data.errors import DataError

STDLIB = "stdlib"
# The file name's ending -> its kind; the compressed kinds come last so that messages list the plain ones first.
KINDS = {".txt": "text", ".jsonl": "jsonl", ".parquet": "parquet", ".jsonl.gz": "jsonl.gz", ".jsonl.zst": "jsonl.zst"}

# Tests are excluded because they hold deliberately odd files (bad encodings, Python 2 syntax);
# encodings/ and pydoc_data/ are generated tables and a documentation blob, not code;
# config-*/ and _sysconfigdata* describe this machine's build, which would tie the fingerprint to it.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                               "__pycache__", "encodings", "pydoc_data"})


@dataclass(frozen=True)
class SourceFile:
    path: Path
    name: str  # stable relative name: the document key and the fingerprint use it, not the absolute path
    kind: str


@dataclass
class Source:
    spec: str | list[str]
    files: list[SourceFile]
    fingerprint: str
    info: dict = field(default_factory=dict)


def stdlib_root() -> Path:
    """Where the standard library lives; tests replace this to use a small fake tree."""
    return Path(sysconfig.get_paths()["stdlib"])


def resolve(spec: str | list[str] | tuple[str, ...]) -> Source:
    """List the files a spec names (sorted, deduplicated) and fingerprint their names and contents."""
    if isinstance(spec, (list, tuple)):
        entries = [str(s) for s in spec]
        if not entries:
            raise DataError(f"source list is empty; pass 'stdlib' or at least one {_kinds_list()} path")
        if STDLIB in entries and len(entries) > 1:
            raise DataError("source 'stdlib' cannot be mixed with file paths; prepare them as separate stores")
        spec = entries[0] if len(entries) == 1 else entries
    elif not isinstance(spec, (str, os.PathLike)):
        raise DataError(f"source {spec!r} is not a string or list of strings; pass 'stdlib' or file paths")
    if spec == STDLIB:
        root = stdlib_root()
        files = _stdlib_files(root)
        info = {"python": sys.version.split()[0]}
    else:
        entries = spec if isinstance(spec, list) else [str(spec)]
        files, seen = [], set()
        for entry in entries:
            for f in _expand(entry):
                if f.path.resolve() not in seen:
                    seen.add(f.path.resolve())
                    files.append(f)
        spec = spec if isinstance(spec, list) else str(spec)
        info = {}
    return Source(spec=spec, files=files, fingerprint=_fingerprint(files), info=info)


def _stdlib_files(root: Path) -> list[SourceFile]:
    if not root.is_dir():
        raise DataError(f"standard-library directory {root} does not exist; "
                        "use a Python with its stdlib sources or pass files")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-"))
        for name in filenames:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                path = Path(dirpath, name)
                files.append(SourceFile(path, path.relative_to(root).as_posix(), "text"))
    if not files:
        raise DataError(f"no .py files under the standard-library directory {root}; this Python ships without "
                        f"sources, pass {_kinds_list()} files instead")
    return sorted(files, key=lambda f: f.name)


def _expand(entry: str) -> list[SourceFile]:
    if glob.has_magic(entry):
        base = _glob_base(entry)
        matches = [Path(m) for m in sorted(glob.glob(entry, recursive=True)) if Path(m).is_file()]
        files = [SourceFile(m, m.relative_to(base).as_posix(), kind_of(m)) for m in matches if kind_of(m)]
        if not files:
            raise DataError(f"glob {entry!r} matches no {_kinds_list()} files; check the pattern")
        return files
    path = Path(entry)
    if path.is_dir():
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                p = Path(dirpath, name)
                if kind_of(p) and not name.startswith("."):
                    files.append(SourceFile(p, f"{path.name}/{p.relative_to(path).as_posix()}", kind_of(p)))
        if not files:
            raise DataError(f"directory {entry} holds no {_kinds_list()} files; add some or point to another directory")
        return sorted(files, key=lambda f: f.name)
    if path.is_file():
        if not kind_of(path):
            ending = "".join(path.suffixes[-2:]) or "(none)"
            raise DataError(f"{entry} has unsupported extension {ending!r}; use {_kinds_list()} files")
        return [SourceFile(path, path.name, kind_of(path))]
    raise DataError(f"source {entry!r} does not exist; "
                    f"pass 'stdlib' or existing {_kinds_list()} files, directories or globs")


def kind_of(path: Path) -> str | None:
    """The kind of corpus file `path` is, from its name's ending; None for any other file."""
    return next((kind for ending, kind in KINDS.items() if path.name.endswith(ending)), None)


def _glob_base(pattern: str) -> Path:
    parts = Path(pattern).parts
    first_magic = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return Path(*parts[:first_magic]) if first_magic else Path(".")


def _kinds_list() -> str:
    return "/".join(KINDS)


def _fingerprint(files: list[SourceFile]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f.path, "rb") as fh:  # in blocks: a corpus file may be larger than memory
            h.update(f.name.encode() + b"\0" + hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()
