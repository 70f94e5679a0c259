"""Sweep tests: specs are written to a temporary directory; config paths in them are relative to the repository
root, which is the working directory of every test here (as of `attnlab sweep` run from a checkout)."""
import shlex
import textwrap
from pathlib import Path

import pytest

from tests.lm.conftest import small_store, tiny_overrides  # noqa: F401  (the fixture, and the tiny settings)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture
def write_spec(tmp_path):
    """write_spec(text, name="s.yaml") -> the path of a spec file holding the dedented text."""
    def write(text: str, name: str = "s.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path
    return write


def train_commands(text: str) -> list[list[str]]:
    """Every `attnlab train ...` command line of a launch script, as argv lists: the plain line of a shell
    script, `srun attnlab train ...` of a SLURM script, or the part of a `gcloud ... ssh --command '...'`
    command of a TPU-VM script that follows its `cd` and setup commands."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        toks = shlex.split(line)
        if toks[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--command" in toks:
            inner = shlex.split(toks[toks.index("--command") + 1])
            parts, cur = [], []
            for t in inner + ["&&"]:
                if t == "&&":
                    parts.append(cur)
                    cur = []
                else:
                    cur.append(t)
            out += [p for p in parts if p[:2] == ["attnlab", "train"]]
        elif toks[:1] == ["srun"] and toks[1:3] == ["attnlab", "train"]:
            out.append(toks[1:-1] if toks[-1] == "&" else toks[1:])  # in the background, for the job's trap
        elif toks[:2] == ["attnlab", "train"]:
            out.append(toks)
    return out


def parse_train(argv: list[str]) -> dict:
    """{"config", "overrides" (the --set values in order), "init_from"} of an `attnlab train` argv."""
    assert argv[:2] == ["attnlab", "train"]
    res = {"config": argv[2], "overrides": [], "init_from": None}
    rest = argv[3:]
    while rest:
        flag, value, rest = rest[0], rest[1], rest[2:]
        if flag == "--set":
            res["overrides"].append(value)
        elif flag == "--init-from":
            res["init_from"] = value
        else:
            raise AssertionError(f"unexpected argument {flag}")
    return res
