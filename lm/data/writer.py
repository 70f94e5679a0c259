"""Writing a token store: stream a corpus through tokenizer processes into shards, then move the store into place.

    1. scan       one pass that decides the split (lm/data/scan.py): only when val is drawn from the source by
                  the hash rule, or a BPE is trained (its sample is the lowest-ranked train documents)
    2. tokenizer  "byte", a tokenizer.json, or a BPE trained on that sample
    3. shards     documents read file by file, tokenized in batches by `workers` processes, written in corpus
                  order to shards of about `shard_tokens` tokens (lm/data/shards.py)
    4. meta.json  written last; then the store is renamed to its path (lm/data/workdir.py)

Memory depends on the workers and the batch size, not on the corpus. Everything before the rename lives in
`.NAME.prepare/` beside the store: a preparation killed at any point, rerun with the same command, continues after
its last finished shard and ends with the same bytes as one never stopped. `num_parts`/`part` prepare a disjoint
share of the input files (whole files, balanced by size, in corpus order), on as many machines; when every part
is finished their shards form one store, the same as one preparation would write. Each part scans every input
file for the split (the cut depends on the whole corpus); with `val_source` and a tokenizer file there is no scan.

A bad input (unreadable file, invalid line, corrupt archive) is a DataError and leaves nothing behind; a failure
of the machine (no space, a killed worker, an interrupt) keeps the finished shards for the rerun.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lm.data import readers
from lm.data import sources as sources_lib
from lm.data import tokenizers as tok_lib
from lm.data.encode import Encoder
from lm.data.errors import DataError
from lm.data.progress import Progress, duration, size
from lm.data.scan import Scan, scan
from lm.data.shards import ROLES, SHARD_TOKENS, SPLITS, ShardWriter, new_stats
from lm.data.shards import write_file as _write_file
from lm.data.split import RULE, SINGLE_DOCUMENT_RULE, VAL_SOURCE_RULE, key_rank, split_single
from lm.data.store import FORMAT, FORMAT_VERSION, META, TOKENIZER_FILE, is_token_store, open_store, token_dtype
from lm.data.workdir import WorkDir

# Bounds BPE training time (about 6 s for the 10 MB stdlib corpus on 2 cores); larger corpora train on a
# deterministic sample of their train documents.
BPE_TRAIN_MAX_BYTES = 20 * 2**20
BPE_RECIPE = (f"byte-level BPE, GPT-2 pre-tokenizer, no special tokens, trained on up to {BPE_TRAIN_MAX_BYTES} "
              "bytes of train documents taken in sha256(key) order")
DEFAULT_VAL_FRACTION = 0.02
# Text sent to a worker at a time; with two batches in flight per worker this bounds what is held in memory.
_BATCH_CHARS = 1 << 20
# A worker costs about a second to start; below this much input per worker it would not pay for itself.
_BYTES_PER_WORKER = 8 * 2**20


@dataclass(frozen=True)
class _File:
    index: int  # in the whole corpus: source files, then val-source files
    file: sources_lib.SourceFile
    role: str  # "split": train or val by the hash rule; "train" or "val": all of it
    size: int


def prepare(source: str | list[str], tokenizer: str, out: str | Path, *, overwrite: bool = False,
            val_fraction: float | None = None, val_source: str | list[str] | None = None, workers: int | None = None,
            shard_tokens: int = SHARD_TOKENS, num_parts: int = 1, part: int | None = None,
            log=print) -> Path | None:
    """Tokenize `source` into a token store at `out`; reuse a complete store made from the same inputs.

    val_source: a separate corpus that is the val split (then `val_fraction` does not apply); workers: tokenizer
    processes (default: the cores, one per 8 MB of input at most); num_parts/part: prepare only part `part` of
    `num_parts`. Returns `out`, or None when a part is finished but others are not yet (nothing to open yet).
    Worker processes start with spawn, which imports the caller's main module again: a script that calls prepare
    with workers > 1 needs the usual `if __name__ == "__main__":` guard.
    """
    out = Path(out)
    log = log or (lambda message: None)
    started = time.perf_counter()
    val_fraction = _check_arguments(val_fraction, val_source, workers, shard_tokens, num_parts, part)
    kind, arg = tok_lib.parse_spec(tokenizer)
    src = sources_lib.resolve(source)
    val_src = sources_lib.resolve(val_source) if val_source is not None else None
    request = {"source_fingerprint": src.fingerprint, "tokenizer": _tokenizer_request(kind, arg),
               "val_fraction": val_fraction}
    if val_src is not None:
        request["val_source_fingerprint"] = val_src.fingerprint
    if _existing_store_matches(out, request, overwrite, source, tokenizer):
        log(f"reusing token store {out} (same source and tokenizer)")
        return out

    files = _corpus_files(src, val_src)
    parts = _assign_parts(files, num_parts)
    work = WorkDir(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work.start({"request": request, "num_parts": num_parts}, _write_file, log)
    except OSError as exc:
        if exc.errno in _WRITE_ERRNOS and not any(work.path.glob("part-*")):
            work.remove()
        raise _write_error(exc, out, work) or exc

    job = _Job(out, work, kind, arg, tokenizer, files, val_fraction, workers, shard_tokens, log)
    for p in [part] if part is not None else ([0] if num_parts == 1 else []):
        with work.lock(f"part-{p:05d}", log):
            if _complete(out, request):  # another process finished it while this one waited
                work.remove()
                log(f"reusing token store {out} (same source and tokenizer)")
                return out
            if work.done(p) is None:
                job.run_part(p, parts[p])
    missing = [p for p in range(num_parts) if work.done(p) is None]
    if missing:
        command = f"attnlab data prepare ... --num-parts {num_parts} --part {missing[0]}"
        if part is None:
            raise DataError(f"cannot combine {out}: part{'s' * (len(missing) > 1)} {_listing(missing)} of {num_parts} "
                            f"{'are' if len(missing) > 1 else 'is'} not finished in {work.path}; run `{command}` "
                            f"(the same --source and --tokenizer) for each, then this command again")
        log(f"part {part} of {num_parts} is finished; {out} is combined when parts {_listing(missing)} are: the last "
            f"part to finish combines them, or run this command without --part")
        return None
    with work.lock("combine", log):
        if _complete(out, request):
            work.remove()
            return out
        meta = job.combine(src, val_src, request, num_parts, overwrite)
    log(f"wrote token store {out}: vocab {meta['vocab_size']}, "
        + ", ".join(f"{name} {m['n_tokens']:,} tokens / {m['n_documents']:,} documents / {size(m['n_bytes'])} of text"
                    for name, m in meta["splits"].items())
        + f"; {size(_disk_bytes(out))} on disk, in {duration(time.perf_counter() - started)}")
    return out


def _check_arguments(val_fraction, val_source, workers, shard_tokens, num_parts, part) -> float | None:
    """The val fraction to use; DataError for arguments that cannot work together."""
    if val_source is not None:
        if val_fraction is not None:
            raise DataError("val_fraction picks val documents out of the source, val_source replaces that split: "
                            "pass one of --val-fraction and --val-source")
    else:
        val_fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}; e.g. 0.02")
        val_fraction = float(val_fraction)
    for name, value in (("workers", workers), ("shard_tokens", shard_tokens), ("num_parts", num_parts)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DataError(f"{name} must be a positive integer, got {value!r}")
    if part is not None and (isinstance(part, bool) or not isinstance(part, int) or not 0 <= part < num_parts):
        raise DataError(f"part must be one of 0..{num_parts - 1} (of --num-parts {num_parts}), got {part!r}")
    return val_fraction


def _listing(parts: list[int]) -> str:
    return ", ".join(map(str, parts[:8])) + (f" (+{len(parts) - 8} more)" if len(parts) > 8 else "")


def _corpus_files(src, val_src) -> list[_File]:
    entries = [(f, "split" if val_src is None else "train") for f in src.files]
    if val_src is not None:
        both = {f.path.resolve() for f in src.files} & {f.path.resolve() for f in val_src.files}
        if both:
            raise DataError(f"{sorted(both)[0]} is in both --source and --val-source (and {len(both) - 1} more); "
                            "a validation corpus must not share files with the training corpus")
        entries += [(f, "val") for f in val_src.files]
    return [_File(i, f, role, f.path.stat().st_size) for i, (f, role) in enumerate(entries)]


def _assign_parts(files: list[_File], num_parts: int) -> list[list[_File]]:
    """Consecutive runs of files, one per part, of about equal bytes: a file goes to the part its middle byte
    falls in. In corpus order, so the parts' shards one after another are the one-part stream."""
    total = sum(f.size for f in files) or 1
    parts: list[list[_File]] = [[] for _ in range(num_parts)]
    before = 0
    for f in files:
        parts[min(num_parts - 1, int((before + f.size / 2) * num_parts / total))].append(f)
        before += f.size
    return parts


class _Job:
    """One preparation: what every part shares (the corpus, the tokenizer, the split) and how a part is run."""

    def __init__(self, out, work, kind, arg, spec, files, val_fraction, workers, shard_tokens, log):
        self.out, self.work, self.kind, self.arg, self.spec = out, work, kind, arg, spec
        self.files, self.val_fraction, self.workers, self.shard_tokens = files, val_fraction, workers, shard_tokens
        self.log = log

    # -- a part --------------------------------------------------------------------------------------------------

    def run_part(self, part: int, files: list[_File]) -> None:
        try:
            self._run_part(part, files)
        except DataError:
            self.work.remove_part(part)
            raise
        except BrokenProcessPool as exc:
            raise DataError(f"a tokenizer worker process died (killed, or out of memory); the finished shards are "
                            f"kept in {self.work.path}: run the same command again to continue (with fewer "
                            f"--workers if memory is short)") from exc
        except OSError as exc:
            error = _write_error(exc, self.out, self.work)
            if error is None:
                raise
            if not self.work.finished_shards(part):
                self.work.remove_part(part)
                error = _write_error(exc, self.out, self.work)
            raise error from exc
        except KeyboardInterrupt:
            self.log(f"interrupted: the finished shards are kept in {self.work.path}; run the same command again to "
                     "continue")
            raise

    def _run_part(self, part: int, files: list[_File]) -> None:
        state = self.work.part_dir(part)
        state.mkdir(parents=True, exist_ok=True)
        records = self.work.finished_shards(part)
        if records:
            file_index, pos = records[-1]["end"]
            self.log(f"resuming {self.out} part {part}: {len(records)} shards finished")
        else:
            file_index, pos = (files[0].index if files else 0), 0
            self.log(f"preparing {self.out}" + (f" part {part}" if len(files) != len(self.files) else "")
                     + f": {len(files)} files, {size(sum(f.size for f in files))}")
        todo = [f for f in files if f.index >= file_index]
        the_scan = self._scan(state)
        tok = self._tokenizer(state, the_scan)
        progress = Progress(f"tokenizing {self.out.name}" + (f" part {part}" if len(self.files) != len(files) else ""),
                            sum(f.size for f in files), self.log,
                            done_bytes=sum(f.size for f in files if f.index < file_index))
        writer = ShardWriter(self.work.store, self.work.records, part, len(records), dtype=token_dtype(tok.vocab_size),
                             vocab_size=tok.vocab_size, shard_tokens=self.shard_tokens,
                             tokenizer_fingerprint=tok.fingerprint)
        workers = self.workers or _default_workers(sum(f.size for f in todo))
        stream = _documents(todo, file_index, pos, the_scan, self.val_fraction, progress.start_bytes)
        last = (file_index, pos)
        try:
            with Encoder(tok, workers) as encoder:
                for batch, arrays in encoder.map(_batches(stream)):
                    tokens = iter(arrays)
                    for doc in batch:
                        if doc.pieces and writer.full:
                            writer.finish(last)
                        writer.note(doc.role, empty=not doc.pieces, replaced=doc.replaced)
                        n_tokens = 0
                        for split, text in doc.pieces:
                            ids = next(tokens)
                            writer.add(split, ids, len(text.encode("utf-8")))
                            n_tokens += len(ids)
                        progress.update(documents=bool(doc.pieces), tokens=n_tokens, bytes_done=doc.bytes_done)
                        last = (doc.file_index, doc.pos)
            end = (files[-1].index + 1, 0) if files else (0, 0)
            writer.finish(end)
        finally:
            writer.abandon()
            progress.close()
        self.work.mark_done(part, {"tokenizer": tok.fingerprint, "scan": the_scan.to_json() if the_scan else None},
                            _write_file)

    # -- what every part computes the same way ---------------------------------------------------------------------

    def _scan(self, state: Path) -> Scan | None:
        """The split's cuts, from the whole corpus (every part needs them); kept for a resumed part."""
        hashed = any(f.role == "split" for f in self.files)
        if not hashed and self.kind != "bpe":
            return None
        cached = state / "scan.json"
        if cached.is_file():
            return Scan.from_json(json.loads(cached.read_text()))
        what = "train/val split" if hashed else "tokenizer sample"
        result = scan(lambda: self._read(("split", "train"), f"scanning for the {what}"),
                      val_fraction=self.val_fraction if hashed else None,
                      sample_bytes=BPE_TRAIN_MAX_BYTES if self.kind == "bpe" else None, log=self.log)
        _write_file(cached, json.dumps(result.to_json()).encode())
        return result

    def _tokenizer(self, state: Path, the_scan: Scan | None) -> tok_lib.Tokenizer:
        if self.kind != "bpe":
            return tok_lib.load(self.spec)
        cached = state / TOKENIZER_FILE
        if cached.is_file():
            return tok_lib.from_json(cached.read_text(encoding="utf-8"), self.spec, str(cached))
        started = time.perf_counter()
        texts = self._bpe_sample(the_scan)
        tok = tok_lib.byte_level_bpe(texts, self.arg, self.spec)
        _write_file(cached, tok.to_json().encode("utf-8"))
        self.log(f"trained {self.spec} on {sum(len(t.encode()) for t in texts) / 1e6:.1f} MB of train text in "
                 f"{time.perf_counter() - started:.1f} s (vocab {tok.vocab_size})")
        return tok

    def _bpe_sample(self, the_scan: Scan) -> list[str]:
        """The train documents ranked from just above the val cut up to the sample cut, in rank order."""
        picked = []
        for index, record in self._read(("split", "train"), "reading the tokenizer sample"):
            if not record.text:
                continue
            if the_scan.single:
                picked.append(((0, 0, 0), split_single(record.text, self.val_fraction)[0]))
                continue
            order = (key_rank(record.key), index, record.pos)
            if order <= the_scan.sample_cut and (the_scan.val_cut is None or order > the_scan.val_cut):
                picked.append((order, record.text))
        return [text for _, text in sorted(picked)]

    def _read(self, roles: tuple[str, ...], what: str) -> Iterator[tuple[int, readers.Record]]:
        """(file index, record) of every file of the corpus with one of `roles`, with a progress line."""
        files = [f for f in self.files if f.role in roles]
        progress = Progress(what, sum(f.size for f in files), self.log)
        done = 0
        try:
            for f in files:
                meter = readers.Meter()
                for record in readers.records(f.file, 0, meter):
                    progress.update(documents=bool(record.text), bytes_done=done + meter.done)
                    yield f.index, record
                done += f.size
        finally:
            progress.close()

    # -- the store ---------------------------------------------------------------------------------------------

    def combine(self, src, val_src, request: dict, num_parts: int, overwrite: bool) -> dict:
        """Write meta.json over the parts' shards and move the store into place; the meta."""
        dones = [self.work.done(p) for p in range(num_parts)]
        records = [r for p in range(num_parts) for r in self.work.finished_shards(p)]
        first_part = {}  # tokenizer fingerprint -> the first part that used it
        used = [*enumerate(d["tokenizer"] for d in dones), *((r["part"], r["tokenizer"]) for r in records)]
        for p, fingerprint in used:
            first_part.setdefault(fingerprint, p)
        if len(first_part) > 1:
            (a, first), (b, other) = list(first_part.items())[:2]
            raise DataError(f"parts {first} and {other} of {self.out} were prepared with different tokenizers "
                            f"(fingerprints {a[:12]} and {b[:12]}); prepare every part with the same --tokenizer "
                            f"(remove {self.work.part_dir(other)} and run part {other} again)")
        if len({json.dumps(d["scan"]) for d in dones}) > 1:
            raise DataError(f"the parts of {self.out} split the corpus differently (the files changed while they were "
                            f"prepared); remove {self.work.path} and prepare every part again")
        tok = self._tokenizer(self.work.part_dir(0), None)
        vocab = tok.vocab_size
        splits, counts = {}, np.zeros((len(SPLITS), vocab), np.int64)
        stats = new_stats()
        for r in records:
            counts += np.load(self.work.records / f"{r['part']:05d}-{r['shard']:05d}.counts.npy")
            for role in ROLES:
                for key, value in r["stats"][role].items():
                    stats[role][key] += value
        for i, name in enumerate(SPLITS):
            shards = [{"tokens": f"{name}/{r['part']:05d}-{r['shard']:05d}.bin",
                       "offsets": f"{name}/{r['part']:05d}-{r['shard']:05d}.offsets.npy",
                       "n_tokens": r["splits"][name]["n_tokens"], "n_documents": r["splits"][name]["n_documents"]}
                      for r in records if r["splits"][name]["n_documents"]]
            n_tokens = sum(s["n_tokens"] for s in shards)
            if n_tokens == 0:
                self.work.remove()
                raise DataError(f"the {name} split tokenized to 0 tokens; the corpus has no text, add documents")
            p = counts[i][counts[i] > 0] / n_tokens
            splits[name] = {
                "n_tokens": n_tokens,
                "n_bytes": sum(r["splits"][name]["n_bytes"] for r in records),
                "n_documents": sum(s["n_documents"] for s in shards),
                # A model that learned only token frequencies reaches this loss; report it beside eval loss.
                "unigram_entropy_bits_per_token": round(float(-(p * np.log2(p)).sum()), 6),
                "shards": shards,
            }
        the_scan = dones[0]["scan"]
        if val_src is not None:
            rule = VAL_SOURCE_RULE
        else:
            rule = SINGLE_DOCUMENT_RULE if the_scan and the_scan["single"] else RULE
        fingerprint_inputs = src.fingerprint + (f"+{val_src.fingerprint}" if val_src is not None else "")
        tok_json = tok.to_json()
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fingerprint": hashlib.sha256(
                f"{fingerprint_inputs}/{tok.fingerprint}/{rule}/{self.val_fraction}".encode()).hexdigest(),
            "vocab_size": vocab,
            "dtype": token_dtype(vocab).name,
            "request": request,
            "source": {"spec": src.spec, "fingerprint": src.fingerprint, "files": len(src.files),
                       **stats["source"], **src.info},
            "tokenizer": {
                "spec": self.spec,
                "fingerprint": tok.fingerprint,
                "file": TOKENIZER_FILE if tok_json is not None else None,
                "recipe": BPE_RECIPE if self.kind == "bpe" else None,
            },
            "split": {"rule": rule, "val_fraction": self.val_fraction},
            "splits": splits,
        }
        if val_src is not None:
            meta["val_source"] = {"spec": val_src.spec, "fingerprint": val_src.fingerprint,
                                  "files": len(val_src.files), **stats["val_source"], **val_src.info}
        try:
            if tok_json is not None:
                _write_file(self.work.store / TOKENIZER_FILE, tok_json.encode("utf-8"))
            _write_file(self.work.store / META, json.dumps(meta, indent=2).encode("utf-8"))
            _install(self.work.store, self.out, request, overwrite)
        except OSError as exc:
            error = _write_error(exc, self.out, self.work)
            if error is None:
                raise
            raise error from exc
        self.work.remove()
        for role, info in (("source", meta["source"]), ("val_source", meta.get("val_source"))):
            if info and (info["empty_skipped"] or info["not_utf8"]):
                self.log(f"{role} {_describe(info['spec'])}: {info['empty_skipped']} empty documents skipped, "
                         f"{info['not_utf8']} documents had bytes that are not UTF-8 (each became U+FFFD)")
        return meta


@dataclass(frozen=True)
class _Doc:
    file_index: int
    pos: int
    role: str  # "source" or "val_source", for the stats
    pieces: list  # (split index, text): none for an empty document, two for a single document split in two
    replaced: bool
    bytes_done: int  # input bytes of the part read up to this document, for the progress line


def _documents(files: list[_File], file_index: int, pos: int, the_scan: Scan | None, val_fraction,
               done: int) -> Iterator[_Doc]:
    """The stream of documents from position (file_index, pos) on, each with the split its text goes to; `done`:
    the input bytes before that position."""
    for f in files:
        meter = readers.Meter()
        for record in readers.records(f.file, pos if f.index == file_index else 0, meter):
            role = "val_source" if f.role == "val" else "source"
            if not record.text:
                pieces = []
            elif f.role != "split":
                pieces = [(SPLITS.index(f.role), record.text)]
            elif the_scan.single:
                pieces = list(enumerate(split_single(record.text, val_fraction)))
            else:
                order = (key_rank(record.key), f.index, record.pos)
                pieces = [(1 if the_scan.val_cut is not None and order <= the_scan.val_cut else 0, record.text)]
            yield _Doc(f.index, record.pos, role, pieces, record.replaced, done + meter.done)
        done += f.size


def _batches(docs: Iterator[_Doc]) -> Iterator[tuple[list[_Doc], list[str]]]:
    batch, texts, chars = [], [], 0
    for doc in docs:
        batch.append(doc)
        for _, text in doc.pieces:
            texts.append(text)
            chars += len(text)
        if chars >= _BATCH_CHARS:
            yield batch, texts
            batch, texts, chars = [], [], 0
    if batch:
        yield batch, texts


def _default_workers(n_bytes: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, n_bytes // _BYTES_PER_WORKER))


def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _complete(out: Path, request: dict) -> bool:
    try:
        return _same_request(open_store(out).meta["request"], request)
    except DataError:
        return False


def _same_request(old: dict, new: dict) -> bool:
    """Whether a store made for request `old` holds what `new` asks for. Stores of format version 1 recorded it
    in their request; their token streams are the same, so it does not count."""
    return {k: v for k, v in old.items() if k != "format_version"} == new


# Write failures the user can act on (space, quota, permissions); other OSErrors propagate as they are.
_WRITE_ERRNOS = {
    errno.ENOSPC: ("no space left on device", "free space"),
    errno.EDQUOT: ("disk quota exceeded", "free space"),
    errno.EROFS: ("read-only file system", "choose a writable --out"),
    errno.EACCES: ("permission denied", "choose a writable --out"),
    errno.EPERM: ("operation not permitted", "choose a writable --out"),
}


def _write_error(exc: OSError, out: Path, work: WorkDir) -> DataError | None:
    """DataError for a storage failure while writing the store at `out`, or None for any other error."""
    if exc.errno not in _WRITE_ERRNOS:
        return None
    reason, advice = _WRITE_ERRNOS[exc.errno]
    where = f" ({exc.filename})" if exc.filename else ""
    left = (f"the finished shards are kept in {work.path} and the rerun continues from them" if work.exists()
            else "nothing was left behind")
    return DataError(f"could not write token store {out}: {reason} ({errno.errorcode[exc.errno]}){where}; "
                     f"{advice} and run prepare again ({left})")


def _describe(spec) -> str:
    return spec if isinstance(spec, str) else f"{spec[0]} (+{len(spec) - 1} more)"


def _tokenizer_request(kind: str, arg) -> str:
    """What decides the tokenizer before it exists: its recipe, or the loaded file's bytes."""
    if kind == "byte":
        return "byte"
    if kind == "bpe":
        return f"bpe:{arg} | {BPE_RECIPE}"
    return "file sha256:" + hashlib.sha256(arg.read_bytes()).hexdigest()


def _existing_store_matches(out: Path, request: dict, overwrite: bool, source, tokenizer) -> bool:
    """True when `out` already holds the store asked for; False when it may be written (absent, empty, or a
    token store to replace with overwrite). Anything that is not a token store is never replaced."""
    if not out.exists():
        return False
    if out.is_dir() and not any(out.iterdir()):
        return False
    if not is_token_store(out):
        what = "a file" if not out.is_dir() else f"a directory that is not a token store (no {META} of one)"
        raise DataError(f"{out} is {what}; prepare writes only to a new path, an empty directory or a token store "
                        f"(which --overwrite replaces): choose another --out")
    try:
        store = open_store(out)
    except DataError as exc:
        if overwrite:
            return False
        raise DataError(f"{out} is a damaged token store ({exc}); pass --overwrite to rebuild it") from exc
    if _same_request(store.meta["request"], request):
        return True
    if overwrite:
        return False
    old = store.meta
    raise DataError(
        f"{out} already holds a token store for source {_describe(old['source']['spec'])} / tokenizer "
        f"{old['tokenizer']['spec']} (val_fraction {old['split']['val_fraction']}, source fingerprint "
        f"{old['source']['fingerprint'][:12]}), not for {_describe(source)} / {tokenizer} (fingerprint "
        f"{request['source_fingerprint'][:12]}); choose another --out or pass --overwrite to replace it"
    )


def _install(tmp: Path, out: Path, request: dict, overwrite: bool) -> None:
    """Move the finished store into place; the target path only ever holds a complete store."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    try:
        os.rename(tmp, out)
        return
    except OSError:
        if not out.exists():
            raise
    if not overwrite:
        # Another process (e.g. a second host) finished a store here while this one was being written.
        try:
            same = _same_request(open_store(out).meta["request"], request)
        except DataError:
            same = False
        if not same:
            raise DataError(f"{out} was created by another process during prepare and holds a different store; "
                            "choose another --out or pass --overwrite")
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / "store")
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
