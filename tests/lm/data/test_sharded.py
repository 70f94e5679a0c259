"""Reading a split that lies in many shards: as one array, as one document index, and through the training and
eval pipelines, against the same corpus in one shard; and stores of format version 1."""

import json

import numpy as np
import pytest

from lm.data import Rows, eval_batches, open_store, prepare, train_iterator
from lm.data.sharded import Documents, Tokens

from .conftest import synthetic_documents, write_text_corpus
from .test_pipeline import assert_same


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same corpus as one shard per split and as shards of about 700 tokens: windows and slices span them."""
    root = tmp_path_factory.mktemp("sharded")
    write_text_corpus(root / "txt", synthetic_documents(30, seed=41, min_words=10, max_words=200))
    one = open_store(prepare(str(root / "txt"), "byte", root / "one", val_fraction=0.2, log=None))
    many = open_store(prepare(str(root / "txt"), "byte", root / "many", val_fraction=0.2, shard_tokens=700, log=None))
    assert len(many.meta["splits"]["train"]["shards"]) > 10 and len(one.meta["splits"]["train"]["shards"]) == 1
    return one, many


def test_tokens_read_across_shards_like_one_array(stores):
    one, many = stores
    whole, tokens = np.asarray(one.split("train")), many.split("train")
    assert isinstance(tokens, Tokens) and len(tokens) == len(whole) and tokens.dtype == whole.dtype
    np.testing.assert_array_equal(np.asarray(tokens), whole)
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = sorted(rng.integers(0, len(whole), 2))
        np.testing.assert_array_equal(tokens[a:b], whole[a:b])
    np.testing.assert_array_equal(tokens[5:-5:7], whole[5:-5:7])
    np.testing.assert_array_equal(tokens[-3:], whole[-3:])
    assert tokens[-1] == whole[-1] and tokens[0] == whole[0]
    index = rng.integers(0, len(whole), (6, 33))
    np.testing.assert_array_equal(tokens[index], whole[index])
    with pytest.raises(IndexError):
        tokens[len(whole)]
    with pytest.raises(IndexError):
        tokens[np.array([0, len(whole)])]


def test_document_index_across_shards(stores):
    one, many = stores
    offsets = one.doc_offsets("train")
    docs = many.documents("train")
    assert isinstance(docs, Documents) and len(docs) == len(offsets) - 1 == many.n_documents("train")
    np.testing.assert_array_equal(many.doc_offsets("train"), offsets)
    ids = np.arange(len(docs))
    starts, ends = docs.bounds(ids[::-1])
    np.testing.assert_array_equal(starts, offsets[:-1][::-1])
    np.testing.assert_array_equal(ends, offsets[1:][::-1])
    positions = np.arange(offsets[-1]).reshape(-1, 1)
    np.testing.assert_array_equal(docs.containing(positions)[:, 0],
                                  np.searchsorted(offsets, positions[:, 0], side="right") - 1)


@pytest.mark.parametrize("rows, packed", [(Rows(), False), (Rows(), True), (Rows("documents", pad_id=0), False),
                                          (Rows("documents", pad_id=0, score_padding=False), False),
                                          (Rows("documents", pad_id=0, score_last=False), False)])
def test_pipeline_batches_do_not_depend_on_the_shards(stores, rows, packed):
    one, many = stores
    kw = dict(seq_len=64, batch_size=4, seed=3, packed=packed, rows=rows, process_index=0, process_count=1)
    it_one, it_many = train_iterator(one, **kw), train_iterator(many, **kw)
    assert_same([next(it_one) for _ in range(40)], [next(it_many) for _ in range(40)])
    ev = dict(seq_len=16, batch_size=2, packed=packed, rows=rows, process_index=1, process_count=2)
    assert_same(eval_batches(one, **ev), eval_batches(many, **ev))


def test_a_format_1_store_is_read_and_reused(stores, tmp_path):
    """A store written before shards (train.bin, train_doc_offsets.npy) opens as one shard per split, and prepare
    reuses it rather than asking for --overwrite: its token streams are the ones prepare writes today."""
    one, _ = stores
    old = tmp_path / "old"
    old.mkdir()
    meta = json.loads((one.path / "meta.json").read_text())
    for name in ("train", "val"):
        (old / f"{name}.bin").write_bytes(np.asarray(one.split(name)).tobytes())
        np.save(old / f"{name}_doc_offsets.npy", one.doc_offsets(name))
        del meta["splits"][name]["shards"]
    meta["format_version"] = 1
    meta["request"] = {"format_version": 1, **meta["request"]}
    (old / "meta.json").write_text(json.dumps(meta))
    store = open_store(old)
    for name in ("train", "val"):
        np.testing.assert_array_equal(np.asarray(store.split(name)), np.asarray(one.split(name)))
        np.testing.assert_array_equal(store.doc_offsets(name), one.doc_offsets(name))
    before = {p.name: p.stat().st_mtime_ns for p in old.iterdir()}
    messages = []
    source = str(one.path.parent / "txt")
    assert prepare(source, "byte", old, val_fraction=0.2, log=messages.append) == old
    assert messages == [f"reusing token store {old} (same source and tokenizer)"]
    assert {p.name: p.stat().st_mtime_ns for p in old.iterdir()} == before
