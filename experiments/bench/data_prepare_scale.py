"""Token-store preparation at scale: peak memory against corpus size, throughput against workers, a kill half way.

    python -m experiments.bench.data_prepare_scale [--work DIR] [--rounds 2] [--skip-large] [--skip-before]

Generates once (deterministic, seeded) a corpus in SlimPajama's layout: .jsonl.zst files of 100 MB of text each,
documents of pseudo-English (a Zipf-distributed vocabulary of 30,000 invented words, sentences and paragraphs) of
about 4 KB. The small corpus is 3 files (0.3 GB of text), the large one 30 (3 GB): the small one's 3 and 27 copies
of them under other names, so the same text ten times under other document keys (and so another split), because
generating 3 GB of new text costs hours on the shared 2-core machine.
Then each preparation runs as `attnlab data prepare` in its own process group, its memory sampled every 0.2 s
(the sum of the resident sets of the process and its workers), its output lines timestamped to split it into
phases (scan, BPE training, tokenizing):

  before   the writer this one replaced (git revision --before-rev, which reads no .zst) on the small corpus as
           plain .jsonl, bpe:8192
  workers  1 and 2 workers on the small corpus, bpe:8192, alternating (1, 2, 2, 1, ...) for --rounds rounds
  large    the large corpus, 2 workers
  kill     the small corpus, 2 workers, SIGKILL to the process group once half its shards are finished, then the
           same command: the store is compared byte for byte with an uninterrupted one
  floor    Hugging Face tokenizers' own batch encoding (encode_batch_fast, one thread) of the first 32 MB of the
           small corpus with the same tokenizer: tokens/s per core

Results accumulate in DIR/results.jsonl (a rerun skips what is there) and are written to
experiments/results/data_prepare_scale.md.
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np

from experiments.sweep import report_head

FILE_MB = 100  # text per corpus file; --file-mb makes a small trial of the whole benchmark
SMALL_FILES, LARGE_FILES = 3, 30
TOKENIZER = "bpe:8192"
SHARD_TOKENS = 10_000_000
FLOOR_BYTES = 32 * 2**20
ROOT = Path(__file__).resolve().parents[2]


# -- the corpus ------------------------------------------------------------------------------------------------


@functools.cache
def _vocabulary(size: int = 30_000) -> np.ndarray:
    """`size` invented words of 1-4 syllables, the same on every machine, shortest first (the most frequent, as in
    a natural language)."""
    rng = np.random.default_rng(0)
    onsets = np.array(["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr",
                       "ch", "sh", "pl", "gr", "br", "th"], dtype=object)
    vowels = np.array(["a", "e", "i", "o", "u", "ea", "ou", "ai", "io"], dtype=object)
    codas = np.array(["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck"], dtype=object)
    words: dict[str, None] = {}
    while len(words) < size:
        syllables = onsets[rng.integers(0, len(onsets), (4, size))] + vowels[rng.integers(0, len(vowels), (4, size))] \
            + codas[rng.integers(0, len(codas), (4, size))]
        lengths = rng.choice([1, 2, 2, 3, 3, 4], size)
        for i, n in enumerate(lengths):
            words.setdefault("".join(syllables[:n, i]), None)
    chosen = np.array(list(words)[:size], dtype=object)
    return chosen[np.argsort([len(w) for w in chosen], kind="stable")]


def _documents(seed: int, text_bytes: int):
    """Documents of about 4 KB: sentences of 4-24 words (the first capitalized, a comma in some, . ? or ! at the
    end), a paragraph break every 3-8 sentences. Built with array operations: 100 MB take seconds."""
    rng = np.random.default_rng(seed)
    vocab = _vocabulary()  # one vocabulary for every file
    cdf = np.cumsum(1.0 / np.arange(1, len(vocab) + 1) ** 1.05)
    cdf /= cdf[-1]
    capitals = np.array([w.capitalize() for w in vocab], dtype=object)
    produced = 0
    while produced < text_bytes:
        n = int(np.clip(rng.lognormal(5.8, 0.8), 20, 20_000))
        idx = np.minimum(np.searchsorted(cdf, rng.random(n)), len(vocab) - 1)
        ends = np.cumsum(rng.integers(4, 25, n))
        ends = np.append(ends[ends < n], n) - 1  # the last word of each sentence
        starts = np.concatenate([[0], ends[:-1] + 1])
        words = vocab[idx]
        words[starts] = capitals[idx[starts]]
        words[ends] = words[ends] + rng.choice(np.array([".", ".", ".", "?", "!"], dtype=object), len(ends))
        commas = starts[rng.random(len(starts)) < 0.3]
        commas = commas[commas < ends[np.searchsorted(ends, commas)]]  # sentences of more than one word
        words[commas] = words[commas] + ","
        gaps = np.full(n, " ", dtype=object)
        paragraph = np.cumsum(rng.integers(3, 9, len(ends)))
        gaps[ends[paragraph[paragraph < len(ends)]]] = "\n\n"
        pieces = np.empty(2 * n - 1, dtype=object)
        pieces[0::2], pieces[1::2] = words, gaps[:-1]
        text = "".join(pieces)
        produced += len(text.encode())
        yield text


def corpus_files(work: Path, n_files: int, kind: str) -> list[Path]:
    """The first `n_files` files of the corpus as .jsonl.zst (`kind` "zst") or plain .jsonl, generated if absent."""
    import zstandard

    directory = work / f"corpus-{FILE_MB}MB"
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_files):
        zst = directory / f"part-{i:03d}.jsonl.zst"
        if not zst.exists() and i >= SMALL_FILES:
            shutil.copyfile(directory / f"part-{i % SMALL_FILES:03d}.jsonl.zst", zst.with_suffix(".tmp"))
            zst.with_suffix(".tmp").rename(zst)
        if not zst.exists():
            lines = "".join(json.dumps({"text": t}) + "\n" for t in _documents(1000 + i, FILE_MB * 10**6)).encode()
            tmp = zst.with_suffix(".tmp")
            tmp.write_bytes(zstandard.ZstdCompressor(level=3, write_checksum=True).compress(lines))
            tmp.rename(zst)
        if kind == "zst":
            paths.append(zst)
            continue
        plain = directory.with_name(directory.name + "-plain") / f"part-{i:03d}.jsonl"
        if not plain.exists():
            plain.parent.mkdir(exist_ok=True)
            with open(zst, "rb") as fh:
                plain.with_suffix(".tmp").write_bytes(zstandard.ZstdDecompressor().stream_reader(fh).read())
            plain.with_suffix(".tmp").rename(plain)
        paths.append(plain)
    return paths


# -- one preparation, measured ---------------------------------------------------------------------------------


def _tree(root: int) -> set[int]:
    """`root` and every process below it."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        kids = [p for p, parent in parents.items() if parent == pid and p not in tree]
        tree.update(kids)
        frontier += kids
    return tree


def _rss(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total


def _cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) the process `pid` itself has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def run_prepare(args: list[str], *, cwd: Path = ROOT, env: dict | None = None, kill_when=None) -> dict:
    """Run `python -m lm.cli data prepare ARGS` (the package found from `cwd`); wall time, peak memory, CPU time,
    timestamped output lines."""
    before = os.times()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lm.cli", "data", "prepare", *args], cwd=cwd,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, peak, load, main_cpu, setup_cpu = [], [0], [], [0.0], [None]

    def read():
        for line in proc.stdout:
            lines.append((time.perf_counter() - started, line.rstrip("\n")))
            if line.startswith("trained "):  # tokenizing starts: no worker has run yet, the process's CPU is all
                setup_cpu[0] = _cpu_s(proc.pid)

    def sample():
        # The process tree is looked up every 5 s only (workers start once): walking /proc costs CPU time
        # that the measured run would otherwise have.
        tree, looked = {proc.pid}, 0.0
        while proc.poll() is None:
            if time.perf_counter() - looked > 5:
                tree, looked = _tree(proc.pid), time.perf_counter()
            peak[0] = max(peak[0], _rss(tree))
            load.append(os.getloadavg()[0])
            main_cpu[0] = _cpu_s(proc.pid) or main_cpu[0]
            if kill_when is not None and kill_when():
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.2)

    threads = [threading.Thread(target=read, daemon=True), threading.Thread(target=sample, daemon=True)]
    for t in threads:
        t.start()
    proc.wait()
    for t in threads:
        t.join(10)
    after = os.times()
    return {"returncode": proc.returncode, "wall_s": time.perf_counter() - started, "peak_rss_bytes": peak[0],
            "cpu_s": (after.children_user - before.children_user) + (after.children_system - before.children_system),
            "main_cpu_s": main_cpu[0], "setup_cpu_s": setup_cpu[0],
            "load": statistics.mean(load) if load else os.getloadavg()[0], "lines": lines}


def _phases(lines: list[tuple[float, str]]) -> dict:
    """Seconds spent before tokenizing (reading the source, scan, BPE training) and tokenizing, from the log."""
    trained = next((t for t, line in lines if line.startswith("trained ")), None)
    end = lines[-1][0] if lines else None
    return {"setup_s": trained, "tokenize_s": end - trained if trained is not None and end else None}


def _store_tokens(out: Path) -> int:
    meta = json.loads((out / "meta.json").read_text())
    return sum(meta["splits"][s]["n_tokens"] for s in ("train", "val"))


def _files_of(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# -- the measurements ------------------------------------------------------------------------------------------


def _fresh(out: Path) -> Path:
    """No store and no unfinished preparation at `out`: every run starts from nothing."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.parent / f".{out.name}.prepare", ignore_errors=True)
    return out


def measure_prepare(work: Path, name: str, files: list[Path], workers: int | None, **kw) -> dict:
    out = _fresh(work / "stores" / name)
    args = ["--source", *map(str, files), "--tokenizer", TOKENIZER, "--out", str(out),
            "--shard-tokens", str(SHARD_TOKENS)]
    args += ["--workers", str(workers)] if workers else []
    result = run_prepare(args, **kw)
    if result["returncode"] != 0:
        raise SystemExit(f"{name}: prepare failed:\n" + "\n".join(line for _, line in result["lines"][-20:]))
    result.update(_phases(result["lines"]), tokens=_store_tokens(out), text_bytes=len(files) * FILE_MB * 10**6,
                  workers=workers, name=name)
    return result


def measure_before(work: Path, revision: str) -> dict:
    """The previous writer: that revision's package, unpacked beside the corpus, reading plain .jsonl."""
    tree = work / f"before-{revision}"
    if not tree.exists():
        archive = subprocess.run(["git", "archive", revision], cwd=ROOT, capture_output=True, check=True).stdout
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(tree, filter="data")
    files = corpus_files(work, SMALL_FILES, "plain")
    out = _fresh(work / "stores" / "before")
    result = run_prepare(["--source", *map(str, files), "--tokenizer", TOKENIZER, "--out", str(out)], cwd=tree,
                         env={"PYTHONPATH": str(tree)})
    if result["returncode"] != 0:
        raise SystemExit("before: prepare failed:\n" + "\n".join(line for _, line in result["lines"][-20:]))
    result.update(_phases(result["lines"]), tokens=_store_tokens(out), text_bytes=SMALL_FILES * FILE_MB * 10**6,
                  workers=None, name=f"before ({revision})")
    return result


def measure_kill(work: Path, reference: Path) -> dict:
    """SIGKILL once half the shards of an uninterrupted run are finished, then the same command to the end."""
    files = corpus_files(work, SMALL_FILES, "zst")
    meta = json.loads((reference / "meta.json").read_text())
    n_shards = len({s["tokens"].split("/")[1] for split in meta["splits"].values() for s in split["shards"]})
    out = _fresh(work / "stores" / "killed")
    records = work / "stores" / ".killed.prepare" / "records"
    command = ["--source", *map(str, files), "--tokenizer", TOKENIZER, "--out", str(out),
               "--shard-tokens", str(SHARD_TOKENS), "--workers", "2"]
    killed = run_prepare(command, kill_when=lambda: len(list(records.glob("*.json"))) >= n_shards // 2)
    finished_at_kill = len(list(records.glob("*.json")))
    rerun = run_prepare(command)
    same = rerun["returncode"] == 0 and _files_of(out) == _files_of(reference)
    return {"name": "kill", "killed_returncode": killed["returncode"], "killed_wall_s": killed["wall_s"],
            "shards_at_kill": finished_at_kill, "shards": n_shards, "rerun_wall_s": rerun["wall_s"],
            "rerun_lines": [line for _, line in rerun["lines"] if "resuming" in line], "byte_identical": same}


def measure_floor(work: Path, store: Path) -> dict:
    """HF tokenizers' encode_batch_fast on one thread, batches of 1 MB of text, the store's tokenizer."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import tokenizers
    import zstandard

    tok = tokenizers.Tokenizer.from_file(str(store / "tokenizer.json"))
    texts, size = [], 0
    with open(corpus_files(work, 1, "zst")[0], "rb") as fh:
        for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8"):
            texts.append(json.loads(line)["text"])
            size += len(texts[-1].encode())
            if size >= FLOOR_BYTES:
                break
    batches, batch, chars = [], [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= 2**20:
            batches.append(batch)
            batch, chars = [], 0
    batches.append(batch)
    times, cpu = [], []
    for _ in range(3):
        started, started_cpu = time.perf_counter(), time.process_time()
        n_tokens = sum(len(e.ids) for b in batches for e in tok.encode_batch_fast(b, add_special_tokens=False))
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return {"name": "floor", "tokens": n_tokens, "text_bytes": size, "best_s": min(times),
            "median_s": statistics.median(times), "median_cpu_s": statistics.median(cpu), "load": os.getloadavg()[0]}


# -- the report --------------------------------------------------------------------------------------------------


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _tokenize_cpu(r: dict) -> float | None:
    """CPU seconds of all processes from the end of the BPE training to the end of the run."""
    return r["cpu_s"] - r["setup_cpu_s"] if r.get("setup_cpu_s") is not None else None


def _row(r: dict) -> str:
    corpus = f"{_gb(r['text_bytes'])} " + (".jsonl" if r["name"].startswith("before") else ".jsonl.zst")
    tokenize = f"{r['tokenize_s']:.0f} s" if r.get("tokenize_s") else "-"
    rate = f"{r['tokens'] / r['tokenize_s']:,.0f}" if r.get("tokenize_s") else "-"
    cpu = _tokenize_cpu(r)
    per_cpu = f"{r['tokens'] / cpu:,.0f}" if cpu else "-"
    return (f"| {r['name']} | {corpus} | {r['workers'] or '-'} | {r['wall_s']:.0f} s | {r['setup_s'] or 0:.0f} s | "
            f"{tokenize} | {r['tokens'] / 1e6:.1f} M | {rate} | {r['cpu_s']:.0f} s | {r.get('main_cpu_s', 0):.0f} s | "
            f"{per_cpu} | {_gb(r['peak_rss_bytes'])} | {r['load']:.1f} |")


def report(results: list[dict], out: Path) -> None:
    by = {}
    for r in results:
        by.setdefault(r["name"], []).append(r)
    lines = ["| run | corpus | workers | wall | before tokenizing | tokenizing | tokens | tokens/s tokenizing | "
             "CPU, all processes | CPU, main process | tokens per CPU-second tokenizing | peak RSS, sum of processes | "
             "load |", "|---" * 13 + "|"]
    for key in [k for k in by if k.startswith("before")] + ["small-w1", "small-w2", "large-w2"]:
        lines += [_row(r) for r in by.get(key, [])]
    text = [report_head("Token-store preparation at scale", "experiments.bench.data_prepare_scale"),
            f"Tokenizer {TOKENIZER}, shards of {SHARD_TOKENS:,} tokens. Each run is one `attnlab data prepare` "
            "process group; wall time includes reading the source, the split's scan and the BPE training on 20 MB "
            "of text (\"before tokenizing\"). Memory is sampled every 0.2 s. The machine is shared: \"load\" is the "
            "mean 1-minute load average while the run ran (2 cores: above 2, other programs took CPU time from it).\n",
            *lines, ""]
    w1 = [r["tokens"] / r["tokenize_s"] for r in by.get("small-w1", [])]
    w2 = [r["tokens"] / r["tokenize_s"] for r in by.get("small-w2", [])]
    if w1 and w2:
        walls = [statistics.median(r["wall_s"] for r in by[key]) for key in ("small-w1", "small-w2")]
        text.append(f"Workers: tokenizing at {statistics.median(w2) / statistics.median(w1):.2f}x the tokens/s with "
                    f"2 workers as with 1 (medians of {len(w2)} and {len(w1)} runs); whole runs "
                    f"{walls[0] / walls[1]:.2f}x.")
    if by.get("large-w2") and by.get("small-w2"):
        small = max(by["small-w2"], key=lambda r: r["peak_rss_bytes"])
        large = by["large-w2"][0]
        text.append(f"Memory: peak {_gb(large['peak_rss_bytes'])} for {_gb(large['text_bytes'])} of text against "
                    f"{_gb(small['peak_rss_bytes'])} for {_gb(small['text_bytes'])} "
                    f"({large['peak_rss_bytes'] / small['peak_rss_bytes']:.2f}x), both with 2 workers.")
    if by.get("floor"):
        f = by["floor"][0]
        floor = f["tokens"] / f["median_s"]
        per_cpu = f", {f['tokens'] / f['median_cpu_s']:,.0f} tokens per CPU-second" if f.get("median_cpu_s") else ""
        text.append(f"Floor: Hugging Face tokenizers' encode_batch_fast on one thread, 1 MB batches, the same "
                    f"tokenizer, the first {f['text_bytes'] / 2**20:.0f} MB of the corpus (median of 3, load "
                    f"{f['load']:.1f}): {floor:,.0f} tokens/s{per_cpu}.")
        ours = [r["tokens"] / _tokenize_cpu(r) for r in by.get("small-w1", []) + by.get("small-w2", [])
                if _tokenize_cpu(r)]
        if ours and f.get("median_cpu_s"):
            per_cpu = f["tokens"] / f["median_cpu_s"]
            text.append(f"Prepare's tokenizing, everything included (reading, decompressing, JSON, the workers, "
                        f"writing): {statistics.median(ours):,.0f} tokens per CPU-second of all its processes, "
                        f"{statistics.median(ours) / per_cpu:.2f}x the floor's (median of {len(ours)} runs).")
    if by.get("kill"):
        k = by["kill"][0]
        text.append(f"Kill: SIGKILL to the process group with {k['shards_at_kill']} of {k['shards']} shards "
                    f"finished (exit {k['killed_returncode']}, after {k['killed_wall_s']:.0f} s); the same command "
                    f"then ran {k['rerun_wall_s']:.0f} s ({'; '.join(k['rerun_lines'])}); the store is "
                    + ("byte-identical to the uninterrupted 2-worker store." if k["byte_identical"]
                       else "NOT byte-identical to the uninterrupted store."))
    out.write_text("\n".join(text) + "\n")


def main(argv=None) -> None:
    global FILE_MB
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/data_prepare_scale", help="corpus, stores and results.jsonl")
    p.add_argument("--rounds", type=int, default=2, help="rounds of 1 and 2 workers on the small corpus")
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--skip-before", action="store_true")
    p.add_argument("--before-rev", default="3b83620", help="the revision whose writer is the 'before' row")
    p.add_argument("--file-mb", type=int, default=FILE_MB, help="text per corpus file (default 100)")
    p.add_argument("--out", default="experiments/results/data_prepare_scale.md")
    a = p.parse_args(argv)
    FILE_MB = a.file_mb
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "results.jsonl"
    results = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {r["step"] for r in results}

    def step(key: str, fn):
        if key in done:
            return
        print(f"[{time.strftime('%H:%M:%S')}] {key}", flush=True)
        r = {**fn(), "step": key}
        r.pop("lines", None)
        results.append(r)
        with open(log, "a") as fh:
            fh.write(json.dumps(r) + "\n")
        report(results, Path(a.out))

    small = corpus_files(work, SMALL_FILES, "zst")
    # What the targets need comes first (one round of workers, the kill, the large corpus); later rounds after.
    rounds = [(i, w) for i in range(a.rounds) for w in ((1, 2) if i % 2 == 0 else (2, 1))]
    for i, workers in rounds[:2]:
        step(f"small-w{workers}-{i}", lambda w=workers: measure_prepare(work, f"small-w{w}", small, w))
    step("kill", lambda: measure_kill(work, work / "stores" / "small-w2"))
    if not a.skip_large:
        large = corpus_files(work, LARGE_FILES, "zst")
        step("large-w2", lambda: measure_prepare(work, "large-w2", large, 2))
    step("floor", lambda: measure_floor(work, work / "stores" / "small-w2"))
    for i, workers in rounds[2:]:
        step(f"small-w{workers}-{i}", lambda w=workers: measure_prepare(work, f"small-w{w}", small, w))
    if not a.skip_before:
        step("before", lambda: measure_before(work, a.before_rev))
    report(results, Path(a.out))


if __name__ == "__main__":
    main()
