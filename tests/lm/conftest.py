import pathlib
import sysconfig

import pytest

from lm import data as lmdata


@pytest.fixture(scope="session")
def small_store(tmp_path_factory) -> pathlib.Path:
    """A byte-level token store of ~1.5 MB of real Python source (a slice of the stdlib), made once per worker."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files, size = [], 0
    for p in sorted(root.glob("*.py")):
        files.append(str(p))
        size += p.stat().st_size
        if size > 1_500_000:
            break
    out = tmp_path_factory.mktemp("data") / "small-byte"
    # .py files are read as text documents through a .txt view of each.
    txt_dir = tmp_path_factory.mktemp("txt")
    for f in files:
        (txt_dir / (pathlib.Path(f).stem + ".txt")).write_text(pathlib.Path(f).read_text(errors="replace"))
    return lmdata.prepare([str(txt_dir)], "byte", out, log=lambda *_: None)


def tiny_overrides(store, run_dir, name="t", **extra) -> list[str]:
    """A ~60K-parameter model that compiles and steps in well under a second on CPU."""
    base = {
        "run.name": name, "run.out_dir": str(run_dir), "data.source": str(store), "data.seq_len": 32,
        "data.batch_size": 4, "model.d_model": 32, "model.n_layers": 2, "model.mlp.hidden": 64,
        "model.mixers.softmax.n_heads": 2, "train.steps": 12, "train.log_every": 1, "train.eval_steps": 2,
        "optim.warmup_steps": 2, "optim.lr": 3e-3, "wandb.mode": "disabled",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
