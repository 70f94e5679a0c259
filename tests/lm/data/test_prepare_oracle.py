"""prepare's stores against the in-memory oracle, token for token, on small corpora of every kind."""

import json

import pytest

from lm.data import prepare

from .conftest import synthetic_documents, write_text_corpus
from .oracle import assert_store_equals_oracle, corpus_documents


def jsonl(path, texts, blank_every=0):
    lines = []
    for i, text in enumerate(texts):
        lines.append(json.dumps({"text": text, "id": i}))
        if blank_every and i % blank_every == 0:
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def mixed(tmp_path):
    """A directory of .txt documents, a .jsonl with blank lines and an empty document, and two files with the
    same name in different directories (their document keys collide, so the split's tie-break matters)."""
    docs = synthetic_documents(60, seed=21, max_words=400)
    txt = write_text_corpus(tmp_path / "txt", docs[:20])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = jsonl(tmp_path / "a" / "same.jsonl", docs[20:40] + [""], blank_every=7)
    b = jsonl(tmp_path / "b" / "same.jsonl", docs[40:])
    source = [str(tmp_path / "txt"), str(a), str(b)]
    files = [(p, f"txt/{p.name}") for p in txt] + [(a, "same.jsonl"), (b, "same.jsonl")]
    return source, corpus_documents(files)


@pytest.mark.parametrize("tokenizer", ["byte", "bpe:400"])
def test_mixed_corpus_equals_the_oracle(mixed, tmp_path, tokenizer):
    source, docs = mixed
    out = prepare(source, tokenizer, tmp_path / "store", log=None)
    assert_store_equals_oracle(out, docs)


def test_larger_val_fraction_equals_the_oracle(mixed, tmp_path):
    source, docs = mixed
    assert_store_equals_oracle(prepare(source, "byte", tmp_path / "store", val_fraction=0.3, log=None), docs, 0.3)


def test_single_document_equals_the_oracle(tmp_path):
    text = "".join(synthetic_documents(3, seed=22))
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    out = prepare(str(tmp_path / "one.txt"), "byte", tmp_path / "store", val_fraction=0.1, log=None)
    assert_store_equals_oracle(out, [("one.txt", text)], 0.1)


def test_non_utf8_text_equals_the_oracle(tmp_path):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "latin1.txt").write_bytes("café crème ".encode("latin-1") * 50)
    (tmp_path / "txt" / "plain.txt").write_text("plain text " * 50)
    out = prepare(str(tmp_path / "txt"), "byte", tmp_path / "store", log=None)
    files = [(tmp_path / "txt" / n, f"txt/{n}") for n in ("latin1.txt", "plain.txt")]
    assert_store_equals_oracle(out, corpus_documents(files))
