"""Failures the user can act on end in one `error:` line (exit status 2) or a one-line warning, never in a
traceback, and lose nothing: a binary tokenizer file, an invalid softmax head size, a full disk or an unwritable
directory while saving a checkpoint or writing a token store, and an unreachable W&B server."""
import errno
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lm.checkpoint import Checkpointer, CheckpointError
from lm.cli import main
from lm.config import ConfigError, load_config
from lm.data import DataError, prepare
from lm.tracking import read_metrics
from tests.lm.conftest import tiny_overrides

TINY = "configs/tiny/softmax.yaml"
ROOT = Path(__file__).resolve().parents[2]
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's temporary directory of a step being written


def _sets(overrides):
    return sum((["--set", o] for o in overrides), [])


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


# --- a binary tokenizer file --------------------------------------------------------------------------------


def test_binary_tokenizer_file_is_one_line(tmp_path, capsys):
    src = tmp_path / "docs"
    src.mkdir()
    (src / "a.txt").write_text("some text to tokenize\n" * 20)
    tok = tmp_path / "tokenizer.json"
    tok.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    code = main(["data", "prepare", "--source", str(src), "--tokenizer", str(tok), "--out", str(tmp_path / "out")])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and str(tok) in line and "not a JSON tokenizer file" in line
    assert not (tmp_path / "out").exists()


# --- softmax mixer sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, says", [
    ("head_dim", -4, "greater than or equal to 1"),
    ("head_dim", 0, "greater than or equal to 1"),
    ("n_kv_heads", -1, "greater than or equal to 1"),
    ("scale", -1.0, "greater than 0"),
])
def test_softmax_sizes_are_validated_naming_the_key(key, value, says):
    with pytest.raises(ConfigError, match=rf"model\.mixers\.softmax\.{key}: .*{says}"):
        load_config(TINY, [f"model.mixers.softmax.{key}={value}"])


def test_info_refuses_a_negative_head_dim(capsys):
    """It used to report negative KV-cache bytes."""
    assert main(["info", TINY, "--set", "model.mixers.softmax.head_dim=-4"]) == 2
    assert "model.mixers.softmax.head_dim" in _one_error_line(capsys.readouterr().err)


# --- a checkpoint save that fails ----------------------------------------------------------------------------


def _enospc(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _tensorstore_enospc(path):
    """What orbax really raises on a full disk (tensorstore's status as a ValueError)."""
    return ValueError(f'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "{path}": Failed to '
                      f"write 203669 bytes to file 26: No space left on device [os_error_code='28']")


def _failing_save(monkeypatch, fail_step: int, make_error):
    """orbax's save writes part of `fail_step` into its temporary directory, then fails with make_error(path)."""
    real = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == fail_step:
            tmp = Path(self.directory) / f"{step}{TMP_SUFFIX}" / "state"
            tmp.mkdir(parents=True)
            (tmp / "partial").write_bytes(b"\0" * 1000)
            raise make_error(tmp / "partial")
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("make_error", [_enospc, _tensorstore_enospc], ids=["oserror", "tensorstore"])
def test_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, make_error, async_save):
    state = {"w": jnp.arange(8, dtype=jnp.float32)}
    ck = Checkpointer(tmp_path / "checkpoints", keep=3, async_save=async_save)
    try:
        ck.save(2, state, {"step": 2}, {"pos": 2})
        _failing_save(monkeypatch, 4, make_error)
        with pytest.raises(CheckpointError) as info:
            ck.save(4, state, {"step": 4}, {"pos": 4})
        assert str(info.value) == (f"could not write checkpoint step 4 to {tmp_path / 'checkpoints'}: no space left "
                                   "on device (ENOSPC); free space and resume — the previous checkpoint (step 2) is "
                                   "intact")
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
        assert ck.steps() == [2]
        monkeypatch.undo()
        step, got, meta, data = ck.restore_latest({"w": jnp.zeros(8, jnp.float32)})
        assert step == 2 and meta["step"] == 2 and data == {"pos": 2}
        np.testing.assert_array_equal(got["w"], np.arange(8))
        ck.save(4, state, {"step": 4}, {"pos": 4})  # with space again, the same step saves
        assert ck.steps() == [2, 4]
    finally:
        ck.close()


_SAVE_UNTIL_FULL = """
import sys
import jax.numpy as jnp
import numpy as np
from lm.checkpoint import Checkpointer, CheckpointError
ck = Checkpointer(sys.argv[1], keep=100, async_save=sys.argv[2] == "async")
state = {f"w{i}": jnp.asarray(np.random.default_rng(i).random(20_000, np.float32)) for i in range(24)}
try:
    for step in range(1, 100):
        ck.save(step, state, {"step": step}, {})
    ck.close()
except CheckpointError as e:
    print(e)
    ck.mngr.close()
"""


@pytest.mark.parametrize("saving", ["sync", "async"])
def test_a_real_full_disk_save_is_quiet(tmp_path, saving):
    """On a real full file system orbax's worker threads and tasks report the failure many times over (absl
    errors, 'Event loop is closed', 'Task exception was never retrieved', with tracebacks): only the
    CheckpointError remains. Needs a small tmpfs, so root."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip(f"mounting a tmpfs needs root (running as uid {os.geteuid()})")
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this machine")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"could not mount a tmpfs: {mounted.stderr.strip()}")
    try:
        out = subprocess.run([sys.executable, "-c", _SAVE_UNTIL_FULL, str(mnt / "checkpoints"), saving], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("could not write checkpoint step ") and "(ENOSPC)" in out.stdout, out.stdout
        assert out.stderr.strip() == "", out.stderr[-3000:]
        assert not list((mnt / "checkpoints").glob(f"*{TMP_SUFFIX}*"))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_read_only_save_and_first_save_messages(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path / "checkpoints", keep=3)
    try:
        _failing_save(monkeypatch, 1, lambda p: OSError(errno.EROFS, os.strerror(errno.EROFS), str(p)))
        with pytest.raises(CheckpointError, match=r"step 1 .*read-only file system \(EROFS\); make the directory "
                                                  r"writable .* there is no earlier checkpoint of this run"):
            ck.save(1, {"w": jnp.ones(2)}, {}, {})
        assert not list((tmp_path / "checkpoints").glob(f"*{TMP_SUFFIX}*"))
    finally:
        ck.close()


def test_a_read_only_checkpointer_restores_without_library_warnings(tmp_path, caplog):
    """eval and generate open the run read-only: orbax's notes on the options it would adjust for that, and on
    the directory being read-only, are not printed; the checkpoint restores."""
    ck = Checkpointer(tmp_path / "checkpoints", keep=3)
    ck.save(1, {"w": jnp.ones(2)}, {}, {})
    ck.close()
    with caplog.at_level(logging.INFO, logger="absl"):
        ro = Checkpointer(tmp_path / "checkpoints", keep=3, read_only=True)
    try:
        assert ro.steps() == [1]
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        ro.close()


def test_a_bug_in_a_save_is_not_dressed_up(tmp_path, monkeypatch):
    """Only storage failures become CheckpointError; anything else propagates as it is (the partial write goes)."""
    ck = Checkpointer(tmp_path / "checkpoints", keep=3)
    try:
        _failing_save(monkeypatch, 1, lambda p: TypeError("a bug"))
        with pytest.raises(TypeError, match="a bug"):
            ck.save(1, {"w": jnp.ones(2)}, {}, {})
        assert not list((tmp_path / "checkpoints").glob(f"*{TMP_SUFFIX}*"))
    finally:
        ck.close()


@pytest.mark.slow
def test_train_on_a_full_disk_is_one_line_and_resumes(small_store, tmp_path, monkeypatch, capsys):
    over = _sets(tiny_overrides(small_store, tmp_path, "full", **{"train.steps": 6, "train.ckpt_every": 2}))
    _failing_save(monkeypatch, 4, _tensorstore_enospc)
    code = main(["train", TINY, *over])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2
    assert line == (f"error: could not write checkpoint step 4 to {tmp_path / 'full' / 'checkpoints'}: no space left "
                    "on device (ENOSPC); free space and resume — the previous checkpoint (step 2) is intact")
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["2"]
    monkeypatch.undo()  # space freed
    assert main(["train", TINY, *over]) == 0
    assert "resuming" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r] == list(range(1, 7))


# --- a token store that cannot be written --------------------------------------------------------------------


def _corpus(tmp_path) -> Path:
    src = tmp_path / "docs"
    src.mkdir()
    for i in range(20):
        (src / f"d{i}.txt").write_text(f"document {i}: " + "some text to model. " * 40)
    return src


def test_prepare_on_a_full_disk_is_a_data_error_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import lm.data.writer as writer

    def full(path, data):  # a buffered write that fails on flush carries no file name
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer, "_write_file", full)
    out = tmp_path / "store"
    with pytest.raises(DataError, match=rf"could not write token store {out}: no space left on device \(ENOSPC\); "
                                        r"free space and run prepare again \(nothing was left behind\)"):
        prepare(str(_corpus(tmp_path)), "byte", out, log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]  # no store, no temporary directory
    code = main(["data", "prepare", "--source", str(tmp_path / "docs"), "--tokenizer", "byte", "--out", str(out)])
    assert code == 2 and "ENOSPC" in _one_error_line(capsys.readouterr().err)


def test_prepare_into_a_read_only_directory(tmp_path, monkeypatch):
    corpus, real_mkdir = _corpus(tmp_path), os.mkdir

    def refuse(path, *args, **kwargs):  # prepare's first write: the directory it builds the store in
        if str(path).startswith(str(tmp_path / ".store")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    with pytest.raises(DataError, match=r"permission denied \(EACCES\) \(.*\); choose a writable --out"):
        prepare(str(corpus), "byte", tmp_path / "store", log=None)


# --- a run directory that cannot be written ------------------------------------------------------------------


def _refuse_writes_under(monkeypatch, root: Path, code: int):
    """os.open of any path under `root` fails with `code`, as on a read-only mount (root ignores chmod)."""
    real = os.open

    def fake(path, flags, *args, **kwargs):
        if str(path).startswith(str(root)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake)


@pytest.mark.parametrize("code, says", [(errno.EROFS, "read-only file system (EROFS); make it writable"),
                                        (errno.EACCES, "permission denied (EACCES); check its permissions")])
def test_train_in_a_read_only_run_directory(small_store, tmp_path, monkeypatch, capsys, code, says):
    run_dir = tmp_path / "ro"
    run_dir.mkdir()
    _refuse_writes_under(monkeypatch, run_dir, code)
    assert main(["train", TINY, *_sets(tiny_overrides(small_store, tmp_path, "ro"))]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {run_dir}") and says in line


def test_oserror_without_a_file_name(monkeypatch, capsys):
    import lm.info

    def full(cfg):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lm.info, "model_info", full)
    assert main(["info", TINY]) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        "error: a file write: no space left on device (ENOSPC); free space and run the command again")


def test_other_oserrors_still_propagate(monkeypatch):
    """A missing file the code should have checked is a bug: its traceback is kept."""
    import lm.info

    def missing(cfg):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/nowhere")

    monkeypatch.setattr(lm.info, "model_info", missing)
    with pytest.raises(FileNotFoundError):
        main(["info", TINY])


# --- W&B online without a network ----------------------------------------------------------------------------


@pytest.mark.slow
def test_wandb_online_without_network_warns_and_continues_offline(small_store, tmp_path):
    """A closed local port as the W&B server: init gives up after WANDB_INIT_TIMEOUT seconds (W&B's own default
    is 90 s), warns in one line and the run trains offline; its offline files can be synced later."""
    env = {**os.environ, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "0" * 40,
           "WANDB_INIT_TIMEOUT": "2", "WANDB_ERROR_REPORTING": "false", "WANDB_DISABLE_CODE": "true"}
    args = ["train", TINY, *_sets(tiny_overrides(small_store, tmp_path, "wbnet", **{"train.steps": 3,
                                                                                    "wandb.mode": "online"}))]
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "lm.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=75)
    assert out.returncode == 0, out.stdout + out.stderr
    assert time.time() - t0 < 60
    warnings = [ln for ln in out.stderr.splitlines() if ln.startswith("warning: W&B")]
    assert len(warnings) == 1 and "continuing offline" in warnings[0] and "wandb sync" in warnings[0], out.stderr
    assert "Traceback" not in out.stderr
    from tests.lm.wandb_reader import history

    files = list((tmp_path / "wbnet" / "wandb").glob("offline-run-*/*.wandb"))
    assert len(files) == 1
    logged = {int(r["_step"]): r["loss"] for r in history(files[0]) if "loss" in r}
    assert logged == pytest.approx({r["step"]: r["loss"] for r in read_metrics(tmp_path / "wbnet" / "metrics.jsonl")
                                    if "loss" in r})
