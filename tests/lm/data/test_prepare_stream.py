"""Preparation at scale, on small corpora: worker processes, shards, a kill and the rerun, parts combined, compressed
and parquet inputs, a separate validation corpus, and the bad inputs that must leave nothing behind."""

import gzip
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lm.cli import main
from lm.data import DataError, open_store, prepare, scan, writer
from lm.data.encode import Encoder
from lm.data.tokenizers import ByteTokenizer

from .conftest import synthetic_documents
from .oracle import assert_store_equals_oracle, corpus_documents

SHARD = 3000  # tokens per shard: every corpus below spans several


def files_of(path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def jsonl_bytes(texts) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def zst_frames(data: bytes, n_frames: int = 3) -> bytes:
    """`data` compressed as several zstd frames (as concatenated .zst files are), with checksums."""
    step = len(data) // n_frames + 1
    compressor = zstandard.ZstdCompressor(write_checksum=True)
    return b"".join(compressor.compress(data[i:i + step]) for i in range(0, len(data), step))


@pytest.fixture
def corpus(tmp_path):
    """The same kind of text in every input format: .jsonl, .jsonl.gz, a multi-frame .jsonl.zst, a .parquet of
    several row groups (with a null row) and .txt documents. Returns (source list, oracle documents)."""
    docs = synthetic_documents(50, seed=31, min_words=20, max_words=300)
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.jsonl").write_bytes(jsonl_bytes(docs[:10]))
    (root / "b.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(docs[10:20])))
    (root / "c.jsonl.zst").write_bytes(zst_frames(jsonl_bytes(docs[20:30] + [""])))
    pq.write_table(pa.table({"text": docs[30:40] + [None]}), root / "d.parquet", row_group_size=3)
    for i, text in enumerate(docs[40:]):
        (root / f"e{i}.txt").write_text(text, encoding="utf-8")
    files = sorted(root.iterdir(), key=lambda p: f"corpus/{p.name}")
    return [str(root)], corpus_documents([(p, f"corpus/{p.name}") for p in files])


def test_every_input_format_streams_into_the_oracle_store(corpus, tmp_path):
    source, docs = corpus
    out = prepare(source, "byte", tmp_path / "store", shard_tokens=SHARD, log=None)
    assert_store_equals_oracle(out, docs)
    meta = open_store(out).meta
    assert len(meta["splits"]["train"]["shards"]) > 3 and meta["source"]["empty_skipped"] == 1
    assert meta["source"]["files"] == 14 and meta["source"]["documents"] == len(docs)


def test_workers_and_shards_write_the_same_bytes(corpus, tmp_path):
    """Two worker processes and one, small shards and one big one: the same token streams; with the same shard
    size, the very same files."""
    source, docs = corpus
    two = prepare(source, "bpe:400", tmp_path / "two", workers=2, shard_tokens=SHARD, log=None)
    one = prepare(source, "bpe:400", tmp_path / "one", workers=1, shard_tokens=SHARD, log=None)
    assert files_of(two) == files_of(one)
    assert_store_equals_oracle(two, docs)
    whole = open_store(prepare(source, "bpe:400", tmp_path / "whole", workers=1, log=None))
    assert len(whole.meta["splits"]["train"]["shards"]) == 1
    assert whole.fingerprint == open_store(two).fingerprint



@pytest.mark.parametrize("caller", [None, "true"])
def test_one_worker_tokenizes_single_threaded_and_restores_the_callers_setting(caller, monkeypatch):
    """One worker is the calling process: the tokenizer's own thread pool is off while it encodes (it would spin
    on every core beside the reading), and the caller's TOKENIZERS_PARALLELISM is back afterwards."""
    if caller is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", caller)
    seen = []

    class Probe(ByteTokenizer):
        def encode_arrays(self, texts):
            seen.append(os.environ.get("TOKENIZERS_PARALLELISM"))
            return super().encode_arrays(texts)

    with Encoder(Probe(), 1) as enc:
        out = list(enc.map([("a", ["ab", "c"]), ("b", ["d"])]))
    assert [tag for tag, _ in out] == ["a", "b"] and [len(a) for a in out[0][1]] == [2, 1]
    assert seen == ["false", "false"] and os.environ.get("TOKENIZERS_PARALLELISM") == caller


KILLER = """
import os, signal
from lm.data import shards, prepare
real_add = shards.ShardWriter.add
def add(self, *args):
    real_add(self, *args)
    if self.shard == {kill_in} and sum(run.n_tokens for run in self.runs) > {half}:  # half way through the shard
        for run in self.runs:
            run.flush()
        os.kill(os.getpid(), signal.SIGKILL)
shards.ShardWriter.add = add
prepare({source!r}, "byte", {out!r}, workers=1, shard_tokens={shard}, log=None)
"""


def test_a_kill_mid_shard_then_the_same_command_gives_the_same_store(corpus, tmp_path):
    """SIGKILL half way through a shard that starts inside the .jsonl.zst file, then the same command: it resumes
    inside the compressed file and the store is byte for byte the one an uninterrupted run writes."""
    source, docs = corpus
    fresh = prepare(source, "byte", tmp_path / "fresh", workers=1, shard_tokens=SHARD, log=None)
    # The first shard that ends inside c.jsonl.zst (documents 20..29 of the corpus): the kill comes in the next.
    zst_start = sum(len(t.encode()) for k, t in docs if k.startswith(("corpus/a.", "corpus/b.")))
    shards = [0] * 99
    for name in ("train", "val"):
        for s in open_store(fresh).meta["splits"][name]["shards"]:
            shards[int(s["tokens"][-9:-4])] += s["n_tokens"]
    ends = np.cumsum(shards)
    resume_after = int(np.argmax(ends > zst_start))
    out = tmp_path / "store"
    script = textwrap.dedent(KILLER.format(source=source, out=str(out), shard=SHARD, half=SHARD // 2,
                                           kill_in=resume_after + 1))
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    work = tmp_path / ".store.prepare"
    records = sorted((work / "records").glob("*.json"))
    assert not out.exists() and len(records) == resume_after + 1
    assert json.loads(records[-1].read_text())["end"][0] == 2  # file 2: c.jsonl.zst, read from the middle
    assert json.loads(records[-1].read_text())["end"][1] > 1
    assert any(p.name.endswith(".partial") for p in (work / "store" / "train").iterdir())  # the killed shard
    messages = []
    prepare(source, "byte", out, workers=1, shard_tokens=SHARD, log=messages.append)
    assert any(f"resuming {out} part 0: {resume_after + 1} shards finished" in m for m in messages)
    assert files_of(out) == files_of(fresh)
    assert not work.exists()
    assert_store_equals_oracle(out, docs)


def test_an_interrupt_keeps_the_finished_shards(corpus, tmp_path, monkeypatch):
    source, _ = corpus
    real_finish = writer.ShardWriter.finish

    def interrupt_after_two(self, end):
        if self.shard == 2:
            raise KeyboardInterrupt
        return real_finish(self, end)

    monkeypatch.setattr(writer.ShardWriter, "finish", interrupt_after_two)
    messages = []
    with pytest.raises(KeyboardInterrupt):
        prepare(source, "byte", tmp_path / "store", shard_tokens=SHARD, log=messages.append)
    assert "the finished shards are kept" in messages[-1]
    assert len(list((tmp_path / ".store.prepare" / "records").glob("*.json"))) == 2


@pytest.mark.parametrize("tokenizer", ["byte", "bpe:400"])
def test_parts_combined_equal_one_preparation(corpus, tmp_path, tokenizer):
    source, docs = corpus
    out = tmp_path / "parts"
    logged = []
    assert prepare(source, tokenizer, out, shard_tokens=SHARD, num_parts=3, part=2, log=logged.append) is None
    assert "combined when parts 0, 1 are" in logged[-1] and not out.exists()
    assert prepare(source, tokenizer, out, shard_tokens=SHARD, num_parts=3, part=0, log=None) is None
    assert prepare(source, tokenizer, out, shard_tokens=SHARD, num_parts=3, part=1, log=None) == out  # the last
    one = open_store(prepare(source, tokenizer, tmp_path / "one", shard_tokens=SHARD, log=None))
    combined = open_store(out)
    assert combined.fingerprint == one.fingerprint and combined.meta["tokenizer"] == one.meta["tokenizer"]
    assert {p.split("-")[0] for s in combined.meta["splits"]["train"]["shards"] for p in [s["tokens"][6:]]} == {
        "00000", "00001", "00002"}
    for name in ("train", "val"):
        np.testing.assert_array_equal(np.asarray(combined.split(name)), np.asarray(one.split(name)))
        np.testing.assert_array_equal(combined.doc_offsets(name), one.doc_offsets(name))
        assert {k: v for k, v in combined.meta["splits"][name].items() if k != "shards"} == {
            k: v for k, v in one.meta["splits"][name].items() if k != "shards"}
    assert combined.meta["source"] == one.meta["source"]
    assert_store_equals_oracle(out, docs)
    assert not (tmp_path / ".parts.prepare").exists()


def test_a_missing_part_is_one_line_and_nothing_is_written(corpus, tmp_path, capsys):
    source, _ = corpus
    out = tmp_path / "parts"
    prepare(source, "byte", out, num_parts=3, part=0, log=None)
    prepare(source, "byte", out, num_parts=3, part=2, log=None)
    with pytest.raises(DataError, match=r"cannot combine .*: part 1 of 3 is not finished .* --num-parts 3 --part 1"):
        prepare(source, "byte", out, num_parts=3, log=None)
    code = main(["data", "prepare", "--source", *source, "--tokenizer", "byte", "--out", str(out), "--num-parts", "3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: cannot combine") and "\n" not in err
    assert not out.exists()
    prepare(source, "byte", out, num_parts=3, part=1, log=None)  # the finished parts were kept: this completes it
    assert open_store(out).n_tokens("train") > 0


def test_parts_with_different_tokenizers_are_refused(corpus, tmp_path):
    source, _ = corpus
    out = tmp_path / "parts"
    prepare(source, "byte", out, num_parts=2, part=0, log=None)
    before = files_of(tmp_path / ".parts.prepare")
    with pytest.raises(DataError, match=r"holds parts of another preparation .* \(tokenizer byte there, bpe:400 \| by"
                                        r"\.\.\. here\); run every part with the same --source, --tokenizer"):
        prepare(source, "bpe:400", out, num_parts=2, part=1, log=None)
    assert files_of(tmp_path / ".parts.prepare") == before and not out.exists()


def test_parts_whose_tokenizers_came_out_different_are_not_combined(corpus, tmp_path, monkeypatch):
    """A part whose BPE came out different (another machine, another library version) is named, and nothing is
    installed."""
    source, _ = corpus
    out = tmp_path / "parts"
    prepare(source, "bpe:400", out, num_parts=2, part=0, log=None)
    real = writer.tok_lib.byte_level_bpe
    monkeypatch.setattr(writer.tok_lib, "byte_level_bpe", lambda texts, n, spec: real(texts[1:], n, spec))
    with pytest.raises(DataError, match=r"parts 0 and 1 of .* were prepared with different tokenizers .* run part 1"):
        prepare(source, "bpe:400", out, num_parts=2, part=1, log=None)
    assert not out.exists()


def test_val_source_is_the_val_split(corpus, tmp_path):
    source, docs = corpus
    val_docs = synthetic_documents(4, seed=32, max_words=200)
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "v.jsonl.zst").write_bytes(zst_frames(jsonl_bytes(val_docs), 1))
    out = prepare(source, "bpe:400", tmp_path / "store", val_source=[str(tmp_path / "val")], shard_tokens=SHARD,
                  log=None)
    store = open_store(out)
    tok = store.tokenizer()
    assert store.meta["split"] == {"rule": writer.VAL_SOURCE_RULE, "val_fraction": None}
    assert store.meta["val_source"]["documents"] == 4 and store.meta["source"]["documents"] == len(docs)
    for name, texts in (("train", [t for _, t in docs]), ("val", val_docs)):
        expected = [tok.encode(t) for t in texts]
        np.testing.assert_array_equal(np.asarray(store.split(name)), np.concatenate(expected))
        np.testing.assert_array_equal(np.diff(store.doc_offsets(name)), [len(e) for e in expected])
    # The BPE sample is drawn from the source alone: the validation corpus never shapes the tokenizer.
    other_val = tmp_path / "other"
    other_val.mkdir()
    (other_val / "v.jsonl").write_bytes(jsonl_bytes(["completely different text " * 40]))
    again = open_store(prepare(source, "bpe:400", tmp_path / "again", val_source=[str(other_val)], log=None))
    assert again.meta["tokenizer"]["fingerprint"] == store.meta["tokenizer"]["fingerprint"]
    with pytest.raises(DataError, match="pass one of --val-fraction and --val-source"):
        prepare(source, "byte", tmp_path / "x", val_source=[str(other_val)], val_fraction=0.1, log=None)
    with pytest.raises(DataError, match=r"a\.jsonl is in both --source and --val-source \(and 0 more\)"):
        prepare(source, "byte", tmp_path / "x", val_source=[f"{source[0]}/a.jsonl"], log=None)
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.prepare").exists()


def _break_zst_checksum(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda p: _break_zst_checksum(p / "c.jsonl.zst"), r"c\.jsonl\.zst is not a valid zstd file"),
    (lambda p: (p / "c.jsonl.zst").write_bytes((p / "c.jsonl.zst").read_bytes()[:-20]),
     r"c\.jsonl\.zst ends inside a zstd frame \(the file is truncated\)"),
    (lambda p: (p / "c.jsonl.zst").write_bytes(b"not zstd at all" * 10), r"c\.jsonl\.zst is not a valid zstd file"),
    (lambda p: (p / "b.jsonl.gz").write_bytes((p / "b.jsonl.gz").read_bytes()[:-30]),
     r"b\.jsonl\.gz ends inside a gzip frame"),
    (lambda p: (p / "d.parquet").write_bytes(b"PAR1 not really"), r"d\.parquet is not a readable parquet file"),
    (lambda p: (p / "e3.txt").rename(p / "e3.jsonl"), r"e3\.jsonl line 1 is not valid JSON"),
])
def test_a_bad_input_is_one_line_and_leaves_nothing(corpus, tmp_path, capsys, damage, message):
    source, _ = corpus
    damage(tmp_path / "corpus")
    with pytest.raises(DataError, match=message):
        prepare(source, "byte", tmp_path / "store", shard_tokens=SHARD, log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
    code = main(["data", "prepare", "--source", *source, "--tokenizer", "byte", "--out", str(tmp_path / "store")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_a_second_process_waits_for_the_first(corpus, tmp_path):
    """Two trainings that prepare the same store at once: the second waits for the first, then reuses its store."""
    import fcntl

    source, _ = corpus
    out = tmp_path / "store"
    work = tmp_path / ".store.prepare"
    work.mkdir()
    holder = open(work / "part-00000.lock", "a")
    fcntl.flock(holder, fcntl.LOCK_EX)
    messages, result = [], {}
    thread = threading.Thread(target=lambda: result.update(out=prepare(source, "byte", out, log=messages.append)))
    thread.start()
    deadline = time.monotonic() + 30
    while not any("waiting: another process is preparing" in m for m in messages) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("waiting" in m for m in messages) and thread.is_alive()
    fcntl.flock(holder, fcntl.LOCK_UN)
    holder.close()
    thread.join(60)
    assert result["out"] == out and open_store(out).n_tokens("train") > 0


def test_progress_lines_and_the_final_line(corpus, tmp_path, monkeypatch):
    from lm.data import progress

    monkeypatch.setattr(progress, "_LOG_EVERY_S", 0.0)
    source, _ = corpus
    messages = []
    prepare(source, "byte", tmp_path / "store", shard_tokens=SHARD, log=messages.append)
    lines = [m for m in messages if m.startswith("tokenizing store:")]
    assert lines and all("documents" in m and "tokens/s" in m and "ETA" in m for m in lines)
    assert "100% of" in lines[-1]
    scanning = [m for m in messages if m.startswith("scanning for the train/val split:")]
    assert scanning and "100% of" in scanning[-1] and messages.index(scanning[-1]) < messages.index(lines[0])
    assert messages[-1].startswith(f"wrote token store {tmp_path / 'store'}: vocab 256, train ")
    assert " on disk, in " in messages[-1]


def test_progress_line_format():
    from lm.data.progress import Progress

    p = Progress("tokenizing x", 4_000_000_000, None, done_bytes=1_000_000_000)
    p.started -= 100.0
    p.update(documents=1234, tokens=5_000_000, bytes_done=2_000_000_000)
    line = p.line(p.started + 100.0)
    assert line == ("tokenizing x: 1,234 documents, 5,000,000 tokens, 50,000 tokens/s, 50% of 4.00 GB, ETA 3m20s")


def test_scan_keeps_only_low_ranked_documents_and_gets_the_same_split(corpus, tmp_path, monkeypatch):
    """The scan's cap (a few candidates per corpus, not all) changes nothing in the store."""
    source, docs = corpus
    monkeypatch.setattr(scan, "PRUNE_AT", 4)
    out = prepare(source, "bpe:400", tmp_path / "store", val_fraction=0.1, log=None)
    assert_store_equals_oracle(out, docs, 0.1)


def test_the_command_line_flags(corpus, tmp_path, capsys):
    source, docs = corpus
    (tmp_path / "val.jsonl").write_bytes(jsonl_bytes(synthetic_documents(3, seed=33, max_words=100)))
    out = str(tmp_path / "store")
    common = ["data", "prepare", "--source", *source, "--tokenizer", "byte", "--out", out, "--workers", "1",
              "--shard-tokens", str(SHARD), "--val-source", str(tmp_path / "val.jsonl")]
    assert main([*common, "--num-parts", "2", "--part", "1"]) == 0
    assert "part 1 of 2 is finished" in capsys.readouterr().out and not (tmp_path / "store").exists()
    assert main([*common, "--num-parts", "2", "--part", "0"]) == 0
    assert f"{out}: vocab 256, train " in capsys.readouterr().out
    store = open_store(out)
    assert store.n_documents("train") == len(docs) and store.n_documents("val") == 3
    assert len(store.meta["splits"]["train"]["shards"]) > 3
    assert main([*common, "--val-fraction", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: val_fraction picks val documents out of the source") and "\n" not in err
    assert main([*common, "--num-parts", "2", "--part", "2"]) == 2
    assert "part must be one of 0..1 (of --num-parts 2), got 2" in capsys.readouterr().err


def test_an_unfinished_preparation_of_something_else_is_removed_saying_so(corpus, tmp_path, monkeypatch):
    source, docs = corpus
    real_finish = writer.ShardWriter.finish

    def interrupt(self, end):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer.ShardWriter, "finish", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare(source, "byte", tmp_path / "store", shard_tokens=SHARD, log=None)
    monkeypatch.setattr(writer.ShardWriter, "finish", real_finish)
    messages = []
    out = prepare(source, "byte", tmp_path / "store", val_fraction=0.1, log=messages.append)
    assert any(m.startswith(f"removed {tmp_path / '.store.prepare'}: it held an unfinished preparation") and
               "val_fraction 0.02 there, 0.1 here" in m for m in messages)
    assert_store_equals_oracle(out, docs, 0.1)


def test_more_parts_than_files(tmp_path):
    (tmp_path / "txt").mkdir()
    texts = synthetic_documents(2, seed=34, max_words=200)
    for i, text in enumerate(texts):
        (tmp_path / "txt" / f"d{i}.txt").write_text(text)
    source = [str(tmp_path / "txt")]
    for part in range(5):
        prepare(source, "byte", tmp_path / "parts", num_parts=5, part=part, val_fraction=0.5, log=None)
    one = prepare(source, "byte", tmp_path / "one", val_fraction=0.5, log=None)
    assert open_store(tmp_path / "parts").fingerprint == open_store(one).fingerprint
    assert_store_equals_oracle(tmp_path / "parts", [(f"txt/d{i}.txt", t) for i, t in enumerate(texts)], 0.5)
