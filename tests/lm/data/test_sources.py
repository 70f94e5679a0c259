import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lm.data import DataError, open_store, prepare
from lm.data.readers import records
from lm.data.sources import resolve
from lm.data.tokenizers import ByteTokenizer

from .conftest import synthetic_documents, write_text_corpus


def read_all(spec) -> list:
    """Every record of every file the spec names, in corpus order."""
    return [r for f in resolve(spec).files for r in records(f)]


def stored_documents(out) -> list[str]:
    """Every document of both splits, decoded back from the store."""
    store = open_store(out)
    tok = store.tokenizer()
    docs = []
    for name in ("train", "val"):
        tokens, offsets = store.split(name), store.doc_offsets(name)
        docs += [tok.decode(tokens[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:])]
    return docs


def test_txt_source(tmp_path):
    docs = synthetic_documents(6, seed=2)
    write_text_corpus(tmp_path / "txt", docs)
    out = prepare(str(tmp_path / "txt"), "byte", tmp_path / "store", log=None)
    assert sorted(stored_documents(out)) == sorted(docs)
    meta = open_store(out).meta
    assert meta["source"]["files"] == 6 and meta["source"]["documents"] == 6


def test_jsonl_source(tmp_path):
    docs = synthetic_documents(7, seed=3)
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(docs)]
    path.write_text("\n".join(lines[:3] + [""] + lines[3:] + [json.dumps({"text": ""})]) + "\n", encoding="utf-8")
    out = prepare(str(path), "byte", tmp_path / "store", log=None)
    assert sorted(stored_documents(out)) == sorted(docs)
    assert open_store(out).meta["source"]["empty_skipped"] == 1


def test_parquet_source(tmp_path):
    docs = synthetic_documents(5, seed=4)
    pq.write_table(pa.table({"text": docs + [None], "n": list(range(6))}), tmp_path / "corpus.parquet")
    out = prepare([str(tmp_path / "corpus.parquet")], "byte", tmp_path / "store", log=None)
    assert sorted(stored_documents(out)) == sorted(docs)


def test_mixed_list_dirs_and_globs(tmp_path):
    write_text_corpus(tmp_path / "a", ["alpha one", "alpha two"])
    write_text_corpus(tmp_path / "b", ["beta one", "beta two", "beta three"])
    (tmp_path / "a" / "notes.md").write_text("skipped: not a supported extension")
    (tmp_path / "a" / ".hidden.txt").write_text("skipped: hidden")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n")
    src = resolve([str(tmp_path / "a"), str(tmp_path / "b" / "*.txt"), str(tmp_path / "c.jsonl"), str(tmp_path / "a")])
    assert [f.name for f in src.files] == [
        "a/doc000.txt", "a/doc001.txt", "doc000.txt", "doc001.txt", "doc002.txt", "c.jsonl"]
    assert [r.text for f in src.files for r in records(f)] == [
        "alpha one", "alpha two", "beta one", "beta two", "beta three", "gamma"]


def test_source_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        resolve(str(tmp_path / "missing.txt"))
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"unsupported extension '\.csv'.*\.txt/\.jsonl/\.parquet"):
        resolve(str(tmp_path / "data.csv"))
    with pytest.raises(DataError, match="matches no"):
        resolve(str(tmp_path / "*.txt"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="holds no"):
        resolve(str(tmp_path / "empty_dir"))
    with pytest.raises(DataError, match="source list is empty"):
        resolve([])


def test_empty_corpus(tmp_path):
    write_text_corpus(tmp_path / "txt", ["", ""])
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare(str(tmp_path / "txt"), "byte", tmp_path / "store", log=None)
    assert not (tmp_path / "store").exists()


def test_jsonl_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(DataError, match='line 2 has no string "text" field'):
        read_all(str(path))
    path.write_text("{not json\n")
    with pytest.raises(DataError, match="line 1 is not valid JSON"):
        read_all(str(path))


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match="no 'text' column \\(columns: body, id\\)"):
        read_all(str(tmp_path / "c.parquet"))


def test_non_utf8_text_is_replaced_and_counted(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (record,) = read_all(str(tmp_path / "latin1.txt"))
    assert record.text == "caf\ufffd" and record.replaced
    out = prepare(str(tmp_path / "latin1.txt"), "byte", tmp_path / "store", val_fraction=0.5, log=None)
    assert open_store(out).meta["source"]["not_utf8"] == 1


def test_fake_stdlib_selection_and_fingerprint(fake_stdlib):
    src = resolve("stdlib")
    names = [f.name for f in src.files]
    assert names == [
        "asyncio/tasks.py", "collections/abc.py", "json/__init__.py", "json/decoder.py", "os.py", "zipfile.py"]
    assert resolve("stdlib").fingerprint == src.fingerprint
    (fake_stdlib / "os.py").write_text("changed\n")
    assert resolve("stdlib").fingerprint != src.fingerprint


def test_stdlib_without_sources(tmp_path, monkeypatch):
    from lm.data import sources

    (tmp_path / "lib").mkdir()
    monkeypatch.setattr(sources, "stdlib_root", lambda: tmp_path / "lib")
    with pytest.raises(DataError, match="no .py files under the standard-library directory"):
        resolve("stdlib")


def test_byte_prepare_counts_match_text(tmp_path):
    docs = synthetic_documents(8, seed=5)
    write_text_corpus(tmp_path / "txt", docs)
    store = open_store(prepare(str(tmp_path / "txt"), "byte", tmp_path / "store", log=None))
    assert store.n_bytes("train") + store.n_bytes("val") == sum(len(d.encode()) for d in docs)
    assert store.n_tokens("train") == store.n_bytes("train")
    assert len(ByteTokenizer().encode(docs[0])) == len(docs[0].encode())
