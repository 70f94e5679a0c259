import json
import shutil
import time

import numpy as np
import pytest

from lm.data import DataError, check_vocab, default_store_path, open_store, prepare, writer
from lm.data.sources import resolve
from lm.data.store import token_dtype

from .conftest import synthetic_documents, write_text_corpus


@pytest.fixture
def corpus(tmp_path):
    write_text_corpus(tmp_path / "txt", synthetic_documents(10, seed=6, max_words=300))
    return str(tmp_path / "txt")


def store_files(path) -> dict[str, bytes]:
    """Every file of a store by its path inside it."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def copy_store(src, dst):
    shutil.copytree(src, dst)
    return dst


def shard(store_path, split, what="tokens"):
    """The file of the first shard of a split."""
    return store_path / open_store(store_path).meta["splits"][split]["shards"][0][what]


def test_meta_and_layout(byte_store, corpus_docs):
    store = open_store(byte_store)
    meta = store.meta
    assert sorted(store_files(byte_store)) == [
        "meta.json", "train/00000-00000.bin", "train/00000-00000.offsets.npy", "val/00000-00000.bin",
        "val/00000-00000.offsets.npy"]
    assert meta["format_version"] == 2 and meta["vocab_size"] == store.vocab_size == 256
    assert meta["dtype"] == "uint16" and store.split("train").dtype == np.uint16
    assert meta["tokenizer"]["spec"] == "byte" and meta["tokenizer"]["file"] is None
    assert len(meta["source"]["fingerprint"]) == 64
    total = sum(store.n_tokens(s) for s in ("train", "val"))
    assert total == sum(len(d.encode()) for d in corpus_docs)
    for name in ("train", "val"):
        offsets = store.doc_offsets(name)
        assert offsets[0] == 0 and offsets[-1] == store.n_tokens(name) == len(store.split(name))
        assert len(offsets) - 1 == meta["splits"][name]["n_documents"] > 0
        assert 0 < meta["splits"][name]["unigram_entropy_bits_per_token"] < 8


def test_token_dtype():
    assert token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_prepare_is_deterministic(corpus, tmp_path):
    a = prepare(corpus, "byte", tmp_path / "a", log=None)
    b = prepare(corpus, "byte", tmp_path / "b", log=None)
    assert store_files(a) == store_files(b)


def test_prepare_reuses_a_matching_store(corpus, tmp_path):
    out = prepare(corpus, "byte", tmp_path / "store", log=None)
    before = {p.name: p.stat().st_ino for p in out.iterdir()}
    messages = []
    assert prepare(corpus, "byte", out, log=messages.append) == out
    assert messages == [f"reusing token store {out} (same source and tokenizer)"]
    assert {p.name: p.stat().st_ino for p in out.iterdir()} == before


def test_prepare_refuses_a_different_store_unless_overwrite(corpus, tmp_path):
    out = prepare(corpus, "byte", tmp_path / "store", log=None)
    other = tmp_path / "other"
    write_text_corpus(other, ["something else entirely"] * 3)
    with pytest.raises(DataError, match="already holds a token store for source .* pass --overwrite"):
        prepare(str(other), "byte", out, log=None)
    with pytest.raises(DataError, match="already holds"):
        prepare(corpus, "byte", out, val_fraction=0.1, log=None)
    prepare(str(other), "byte", out, overwrite=True, log=None)
    assert open_store(out).n_tokens("train") + open_store(out).n_tokens("val") == 3 * len("something else entirely")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_crash_mid_write_leaves_no_store_and_the_rerun_finishes_it(corpus, tmp_path, monkeypatch):
    """Killed while writing meta.json: nothing at the store's path; the work so far waits beside it, and the same
    call finishes the store as if it had never stopped."""
    real_write = writer._write_file

    def crash_on_meta(path, data):
        if path.name == "meta.json":
            raise KeyboardInterrupt("killed while writing")
        real_write(path, data)

    monkeypatch.setattr(writer, "_write_file", crash_on_meta)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, "byte", tmp_path / "store", log=None)
    assert not (tmp_path / "store").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".store.prepare", "txt"]
    monkeypatch.setattr(writer, "_write_file", real_write)
    out = prepare(corpus, "byte", tmp_path / "store", log=None)
    assert store_files(out) == store_files(prepare(corpus, "byte", tmp_path / "fresh", log=None))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "store", "txt"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_prepare_never_replaces_what_is_not_a_token_store(corpus, tmp_path, overwrite):
    """A run directory, an ordinary file, a directory with an unrelated meta.json: refused with or without
    --overwrite, byte for byte untouched, and the message does not suggest --overwrite as the fix."""
    run = tmp_path / "runs" / "mine"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    plain = tmp_path / "notes.txt"
    plain.write_text("keep me")
    foreign = tmp_path / "other_tool"
    foreign.mkdir()
    (foreign / "meta.json").write_text('{"format": "something else"}')
    for target in (run, plain, foreign):
        before = {p: p.read_bytes() for p in [target, *target.rglob("*")] if p.is_file()}
        with pytest.raises(DataError, match="choose another --out") as err:
            prepare(corpus, "byte", target, overwrite=overwrite, log=None)
        assert "pass --overwrite" not in str(err.value)
        assert {p: p.read_bytes() for p in [target, *target.rglob("*")] if p.is_file()} == before
    assert (run / "checkpoints").is_dir()


def test_prepare_overwrites_a_damaged_token_store(byte_store, corpus, tmp_path):
    broken = copy_store(byte_store, tmp_path / "broken")
    shard(broken, "val").unlink()
    with pytest.raises(DataError, match="is a damaged token store .* pass --overwrite"):
        prepare(corpus, "byte", broken, log=None)
    prepare(corpus, "byte", broken, overwrite=True, log=None)
    assert open_store(broken).n_tokens("val") > 0


def test_leftover_temp_dir_and_empty_target_are_harmless(corpus, tmp_path):
    (tmp_path / ".store.tmp-dead").mkdir()
    (tmp_path / ".store.tmp-dead" / "train.bin").write_bytes(b"\0" * 10)
    (tmp_path / "store").mkdir()
    out = prepare(corpus, "byte", tmp_path / "store", log=None)
    assert open_store(out).n_tokens("train") > 0


def test_store_without_meta(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train.bin").write_bytes(b"\0\0")
    expected = r"half is not a token store \(no meta.json\): give a directory made by `attnlab data prepare`"
    with pytest.raises(DataError, match=expected):
        open_store(tmp_path / "half")
    with pytest.raises(DataError, match="a directory that is not a token store"):
        prepare("stdlib", "byte", tmp_path / "half", log=None)
    with pytest.raises(DataError, match="does not exist"):
        open_store(tmp_path / "missing")


def test_truncated_tokens_are_detected(byte_store, tmp_path):
    broken = copy_store(byte_store, tmp_path / "broken")
    n = open_store(broken).n_tokens("train")
    tokens = shard(broken, "train")
    with open(tokens, "r+b") as fh:
        fh.truncate(2 * (n - 100))
    with pytest.raises(DataError) as err:
        open_store(broken)
    message = str(err.value)
    assert f"is corrupted: train/00000-00000.bin has {n - 100} tokens, meta.json says {n}" in message
    assert "attnlab data prepare --source" in message and "--overwrite" in message and "\n" not in message
    with open(tokens, "r+b") as fh:
        fh.truncate(2 * n - 1)
    with pytest.raises(DataError, match="not a whole number of uint16 tokens"):
        open_store(broken)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "meta.json").write_text("{truncated"), "meta.json is not valid JSON"),
        (lambda d: _edit_meta(d, dtype="uint32"), "says dtype uint32, but vocab_size 256 is stored as uint16"),
        (lambda d: _edit_meta(d, format_version=99), "format version 99"),
        (lambda d: _edit_meta(d, splits=None), "missing or has a bad field"),
        (lambda d: shard(d, "val").unlink(), "val/00000-00000.bin is missing"),
        (lambda d: np.save(shard(d, "val", "offsets"), np.array([0, 5])), "does not describe"),
        (lambda d: _edit_meta(d, splits={**_meta(d)["splits"], "val": {**_meta(d)["splits"]["val"], "n_tokens": 1}}),
         "val shards listed in meta.json do not add up"),
    ],
)
def test_damaged_store(byte_store, tmp_path, damage, message):
    broken = copy_store(byte_store, tmp_path / "broken")
    damage(broken)
    with pytest.raises(DataError, match=message):
        open_store(broken)


def _meta(directory) -> dict:
    return json.loads((directory / "meta.json").read_text())


def _edit_meta(directory, **changes):
    meta = _meta(directory)
    meta.update(changes)
    (directory / "meta.json").write_text(json.dumps(meta))


def test_check_vocab(byte_store):
    check_vocab(byte_store, 256)
    check_vocab(open_store(byte_store), 512)
    with pytest.raises(DataError, match="model vocab_size 100 is smaller than the vocab_size 256 .* at least 256"):
        check_vocab(byte_store, 100)


def test_val_fraction_must_be_a_fraction(corpus, tmp_path):
    with pytest.raises(DataError, match="val_fraction must be between 0 and 1"):
        prepare(corpus, "byte", tmp_path / "store", val_fraction=0.0, log=None)


def test_default_store_path(tmp_path):
    assert default_store_path("data", "stdlib", "byte") == default_store_path("data", ["stdlib"], "byte")
    assert str(default_store_path("data", "stdlib", "byte")) == "data/stdlib-byte"
    assert str(default_store_path("data", "stdlib", "bpe:8192")) == "data/stdlib-bpe8192"
    a = default_store_path("data", "corpora/a/books.jsonl", "byte")
    assert a.name.startswith("books-") and a.name.endswith("-byte")
    assert a != default_store_path("data", "corpora/b/books.jsonl", "byte")


def test_fake_stdlib_prepare_is_deterministic(fake_stdlib, tmp_path):
    a = prepare("stdlib", "byte", tmp_path / "a", log=None)
    b = prepare("stdlib", "byte", tmp_path / "b", log=None)
    assert store_files(a) == store_files(b)
    meta = open_store(a).meta
    assert meta["source"]["files"] == 6 and meta["source"]["spec"] == "stdlib"


def test_real_stdlib_prepare(tmp_path):
    started = time.perf_counter()
    store = open_store(prepare("stdlib", "byte", tmp_path / "stdlib-byte", log=None))
    assert time.perf_counter() - started < 15
    meta = store.meta
    assert meta["source"]["files"] > 100 and meta["source"]["not_utf8"] == 0
    assert store.n_tokens("train") > 10 * store.n_tokens("val") > 0
    assert store.n_bytes("val") >= 0.02 * (store.n_bytes("train") + store.n_bytes("val"))
    text = store.tokenizer().decode(store.split("train")[:2000].tolist())
    assert "import" in text or "def " in text
    assert resolve("stdlib").fingerprint == meta["source"]["fingerprint"]


def test_large_vocab_is_stored_as_uint32(tmp_path):
    import tokenizers as hf

    vocab = {"[UNK]": 0} | {f"w{i}": i for i in range(1, 70_000)}
    word_level = hf.Tokenizer(hf.models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = hf.pre_tokenizers.WhitespaceSplit()
    word_level.save(str(tmp_path / "tokenizer.json"))
    write_text_corpus(tmp_path / "txt", ["w1 w69999 w65536", "w2 w3", "w70000 w4 w5 w6"])
    store = open_store(prepare(str(tmp_path / "txt"), str(tmp_path / "tokenizer.json"), tmp_path / "store", log=None))
    assert store.meta["dtype"] == "uint32" and store.split("train").dtype == np.uint32
    stored = np.concatenate([store.split("train"), store.split("val")]).tolist()
    assert sorted(stored) == sorted([1, 69999, 65536, 2, 3, 0, 4, 5, 6])
