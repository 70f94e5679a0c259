"""Accelerator installs and `run.platform`: the pyproject extras resolve to jax's plugin for the pinned jax, and a
run that asks for an accelerator jax does not see refuses to start in one line instead of training on the CPU."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from lm import devices
from lm.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = "configs/tiny/softmax.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("extra, wanted", [("cuda12", {"jax-cuda12-plugin": "0.11.2", "jax-cuda12-pjrt": "0.11.2"}),
                                           ("tpu", {"libtpu": None})])
def test_accelerator_extras_resolve_to_the_pinned_jax_plugin(tmp_path, extra, wanted):
    """pip resolves `.[cuda12]` / `.[tpu]` against the package index (nothing is installed). The project is its
    pyproject.toml and README beside empty packages: building metadata from the checkout itself would walk every
    file below it (runs, data stores)."""
    project = tmp_path / "attnlab"
    for package in ("lm", "attention", "kernels_pallas", "experiments"):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").touch()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    report = tmp_path / "report.json"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                          f"{project}[{extra}]"], capture_output=True, text=True, timeout=600)
    if res.returncode and any(s in res.stderr for s in ("NewConnectionError", "Temporary failure in name resolution",
                                                       "Network is unreachable")):
        pytest.skip(f"the package index is unreachable from here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr
    got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    for name, version in wanted.items():
        assert name in got, (name, sorted(got))
        assert version is None or got[name] == version, (name, got[name])
    assert got.get("jax", "0.11.2") == "0.11.2"  # the extra never moves jax itself


def test_describe_names_platform_count_and_kind():
    line = devices.describe()
    assert line.startswith(f"jax {jax.__version__} sees ") and "cpu device(s) (cpu)" in line


@pytest.mark.parametrize("want", ["gpu", "tpu"])
def test_train_refuses_an_accelerator_jax_does_not_see(tmp_path, capsys, want):
    code = main(["train", TINY, "--set", f"run.platform={want}", "--set", f"run.out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    extra = devices.EXTRA[want]
    assert err[0].startswith(f"error: run.platform={want} but jax sees cpu devices only (no accelerator plugin "
                             f"installed); jax's {want} plugin ({devices.PLUGIN[want]}) is not installed here: "
                             f"`make install DEVICE={extra}`")
    assert not any(tmp_path.iterdir())  # refused before the run directory was made


def test_platform_auto_and_cpu_accept_the_cpu():
    devices.check_platform("auto")
    devices.check_platform("cpu")


def test_make_install_knows_its_devices():
    res = subprocess.run(["make", "-n", "install", "DEVICE=cuda12"], cwd=ROOT, capture_output=True, text=True)
    assert "pip install -q -e '.[test,cuda12]'" in res.stdout, res.stdout
    res = subprocess.run(["make", "install", "DEVICE=rocm"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0 and "DEVICE=rocm is not one of cpu, cuda12, tpu" in res.stderr


def test_the_launch_scripts_environment_check():
    """`python -m lm.devices gpu` (what submit scripts run on a login node): one line and exit 2 without jax's CUDA
    plugin; nothing imports jax."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "lm.devices", "gpu"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if not ln.startswith("import time:")]
    assert lines == ["error: jax's gpu plugin (jax-cuda12-plugin) is not installed here: `make install DEVICE=cuda12` "
                     "(or pip install 'attnlab[cuda12]'); the jobs would train on the CPU"]
    assert not any(ln.split("|")[-1].strip().startswith("jax") for ln in res.stderr.splitlines()
                   if ln.startswith("import time:"))
    ok = subprocess.run([sys.executable, "-m", "lm.devices", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "cpu: no accelerator plugin needed"
