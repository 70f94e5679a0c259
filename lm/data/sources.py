"""Corpora: which files a source spec names, their fingerprint, and the documents in them.

A source spec is "stdlib" (the running Python's standard-library sources) or one path, directory
or glob, or a list of them, naming `.txt` files (one document each), `.jsonl` files (a "text"
field per line) and `.parquet` files (a "text" column).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from lm.data.errors import DataError

STDLIB = "stdlib"
KINDS = {".txt": "text", ".jsonl": "jsonl", ".parquet": "parquet"}

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


@dataclass(frozen=True)
class Document:
    key: str  # what the train/val split hashes
    text: str


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
            raise DataError("source list is empty; pass 'stdlib' or at least one .txt/.jsonl/.parquet path")
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
        files = [SourceFile(m, m.relative_to(base).as_posix(), KINDS[m.suffix]) for m in matches if m.suffix in KINDS]
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
                if p.suffix in KINDS and not name.startswith("."):
                    files.append(SourceFile(p, f"{path.name}/{p.relative_to(path).as_posix()}", KINDS[p.suffix]))
        if not files:
            raise DataError(f"directory {entry} holds no {_kinds_list()} files; add some or point to another directory")
        return sorted(files, key=lambda f: f.name)
    if path.is_file():
        if path.suffix not in KINDS:
            raise DataError(f"{entry} has unsupported extension {path.suffix or '(none)'!r}; use {_kinds_list()} files")
        return [SourceFile(path, path.name, KINDS[path.suffix])]
    raise DataError(f"source {entry!r} does not exist; "
                    f"pass 'stdlib' or existing {_kinds_list()} files, directories or globs")


def _glob_base(pattern: str) -> Path:
    parts = Path(pattern).parts
    first_magic = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return Path(*parts[:first_magic]) if first_magic else Path(".")


def _kinds_list() -> str:
    return "/".join(KINDS)


def _fingerprint(files: list[SourceFile]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.path.read_bytes()).digest())
    return h.hexdigest()


def read_documents(source: Source) -> tuple[list[Document], dict]:
    """All non-empty documents in file order, and counts worth logging."""
    docs: list[Document] = []
    stats = {"files": len(source.files), "documents": 0, "empty_skipped": 0, "not_utf8": 0}
    for f in source.files:
        for key, text in _file_documents(f, stats):
            if text:
                docs.append(Document(key, text))
            else:
                stats["empty_skipped"] += 1
    stats["documents"] = len(docs)
    return docs, stats


def _decode(f: SourceFile, stats: dict) -> str:
    data = f.path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # One stray byte should not sink a corpus; the count is logged so it is never silent.
        stats["not_utf8"] += 1
        return data.decode("utf-8", errors="replace")


def _file_documents(f: SourceFile, stats: dict):
    if f.kind == "text":
        yield f.name, _decode(f, stats)
    elif f.kind == "jsonl":
        yield from _jsonl_documents(f, _decode(f, stats))
    else:
        yield from _parquet_documents(f)


def _jsonl_documents(f: SourceFile, content: str):
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which splitlines would cut.
    for lineno, line in enumerate(content.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{f.path} line {lineno} is not valid JSON ({exc.msg}); fix or remove that line") from exc
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f'{f.path} line {lineno} has no string "text" field; '
                            'every line must look like {"text": "..."}')
        yield f"{f.name}:{lineno}", text


def _parquet_documents(f: SourceFile):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(f.path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{f.path} is not a readable parquet file ({exc}); check the file") from exc
    if "text" not in schema.names:
        raise DataError(f"{f.path} has no 'text' column (columns: {', '.join(schema.names)}); "
                        "rename the text column to 'text'")
    column = pq.read_table(f.path, columns=["text"]).column("text")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"{f.path} column 'text' has type {column.type}, not string; store the documents as strings")
    for row, text in enumerate(column.to_pylist()):
        if text is not None:
            yield f"{f.name}:{row}", text
