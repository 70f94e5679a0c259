import json

import numpy as np
import pytest

from lm.data import DataError, open_store, prepare
from lm.data.tokenizers import ByteTokenizer, load, parse_spec

from .conftest import synthetic_documents, write_text_corpus

SAMPLES = ["", "hello world\n", "naïve café — π ≈ 3.14159", "数据 🙂 emoji\r\n\ttabs", "\x00 control \x7f"]


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_roundtrip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < tok.vocab_size == 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, dtype=np.int32)) == text


def test_byte_decode_replaces_what_is_not_text():
    tok = ByteTokenizer()
    assert tok.decode([0xE6, 0x95]) == "\ufffd"  # a truncated multi-byte character
    # ids a padded model vocab might emit beyond the 256 byte values
    assert tok.decode([104, 300, 105, -1]) == "h\ufffdi\ufffd"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bpe:abc", "bpe:N with N an integer"),
        ("bpe:200", "needs more than 256"),
        ("nonexistent/tokenizer.json", "not 'byte', 'bpe:N' or an existing tokenizer.json"),
        ("", "is not a string"),
    ],
)
def test_bad_tokenizer_spec(spec, message):
    with pytest.raises(DataError, match=message):
        parse_spec(spec)


def test_malformed_tokenizer_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(DataError, match="not a valid Hugging Face tokenizer file"):
        load(str(path))


@pytest.fixture(scope="module")
def bpe_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    write_text_corpus(root / "txt", synthetic_documents(12, seed=1, max_words=400))
    return prepare(str(root / "txt"), "bpe:300", root / "store", log=None)


def test_bpe_train_roundtrip(bpe_store):
    store = open_store(bpe_store)
    tok = store.tokenizer()
    assert tok.spec == "bpe:300" and tok.vocab_size == store.vocab_size <= 300
    assert (bpe_store / "tokenizer.json").is_file() and store.meta["tokenizer"]["file"] == "tokenizer.json"
    for text in SAMPLES + synthetic_documents(3, seed=7, max_words=100):
        assert tok.decode(tok.encode(text)) == text
    # The stored tokens are the tokenizer's encoding of each document, and they decode back to the text.
    tokens, offsets = store.split("train"), store.doc_offsets("train")
    first = tok.decode(tokens[offsets[0]:offsets[1]].tolist())
    assert tok.encode(first) == tokens[offsets[0]:offsets[1]].tolist()
    assert store.n_tokens("train") < store.n_bytes("train")  # merges compress the text


def test_bpe_training_is_deterministic(bpe_store, tmp_path):
    again = prepare(str(bpe_store.parent / "txt"), "bpe:300", tmp_path / "again", log=None)
    assert (again / "tokenizer.json").read_bytes() == (bpe_store / "tokenizer.json").read_bytes()
    assert np.array_equal(open_store(again).split("train"), open_store(bpe_store).split("train"))


def test_load_tokenizer_json(bpe_store, tmp_path):
    path = str(bpe_store / "tokenizer.json")
    loaded = load(path)
    assert loaded.spec == path and loaded.vocab_size == open_store(bpe_store).vocab_size
    out = prepare(str(bpe_store.parent / "txt"), path, tmp_path / "loaded", log=None)
    store = open_store(out)
    assert store.tokenizer().fingerprint == open_store(bpe_store).tokenizer().fingerprint
    assert np.array_equal(store.split("train"), open_store(bpe_store).split("train"))
    assert (out / "tokenizer.json").read_bytes() == (bpe_store / "tokenizer.json").read_bytes()


def test_binary_tokenizer_file_is_a_data_error(tmp_path):
    """A binary file given as tokenizer.json names the file and says what it is not (no UnicodeDecodeError)."""
    path = tmp_path / "tokenizer.json"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(DataError, match=r"tokenizer\.json is not a JSON tokenizer file") as info:
        load(str(path))
    assert str(path) in str(info.value)
