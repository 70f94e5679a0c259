import numpy as np
import pytest

from lm.data import prepare

WORDS = ["def", "return", "self", "value", "the", "of", "and", "import", "x", "y", "naïve", "café", "π", "数据", "🙂"]


def synthetic_documents(n_docs: int, seed: int, min_words: int = 80, max_words: int = 1500) -> list[str]:
    """Deterministic pseudo-text with multi-byte characters and varied document lengths."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        words = rng.choice(WORDS, size=int(rng.integers(min_words, max_words)))
        numbers = rng.integers(0, 1000, size=len(words))  # keeps short windows of the text nearly unique
        breaks = rng.random(len(words)) < 0.1
        docs.append("".join(f"{w}{n}" + ("\n" if b else " ") for w, n, b in zip(words, numbers, breaks)))
    return docs


def write_text_corpus(directory, docs: list[str]) -> list:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(docs):
        path = directory / f"doc{i:03d}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    return synthetic_documents(40, seed=0)


@pytest.fixture(scope="session")
def byte_store(tmp_path_factory, corpus_docs):
    """A small byte-level store shared by read-only tests."""
    root = tmp_path_factory.mktemp("corpus")
    write_text_corpus(root / "txt", corpus_docs)
    return prepare(str(root / "txt"), "byte", root / "store", log=None)


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
    """A tiny standard-library tree, so stdlib preparation can be tested in milliseconds."""
    from lm.data import sources

    root = tmp_path / "fake_stdlib"
    files = {
        "os.py": "import sys\n\ndef getcwd():\n    return '/'\n",
        "json/__init__.py": "from .decoder import JSONDecoder\n",
        "json/decoder.py": "class JSONDecoder:\n    pass\n" * 20,
        "collections/abc.py": "from _collections_abc import *\n",
        "asyncio/tasks.py": "async def sleep(t):\n    return t\n" * 10,
        "zipfile.py": "ZIP64_LIMIT = (1 << 31) - 1\n" * 5,
        "test/test_os.py": "raise SystemExit('test files are excluded')\n",
        "json/tests/test_decode.py": "raise SystemExit('tests/ is excluded')\n",
        "site-packages/pkg/mod.py": "raise SystemExit('site-packages is excluded')\n",
        "encodings/cp1252.py": "decoding_table = ('\\x00')\n",
        "__pycache__/os.cpython-311.py": "raise SystemExit('caches are excluded')\n",
        "README.txt": "not python\n",
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(sources, "stdlib_root", lambda: root)
    return root
