import subprocess
import sys

import pytest

from lm.config import ConfigError, dump_config, load_config, parse_yaml, resolved_mesh

TINY = "configs/tiny/softmax.yaml"


def _err(overrides, path=TINY):
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


def test_base_inheritance_and_overrides():
    cfg = load_config(TINY, ["optim.lr=1e-3", "run.name=lr1e-3", "model.pattern=[softmax, softmax]"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.run.name == "lr1e-3"
    assert cfg.model.pattern == ["softmax", "softmax"]
    assert cfg.model.d_model == 192  # from the tiny file
    assert cfg.optim.b2 == 0.95  # from base.yaml
    assert cfg.model.mixers["softmax"].n_heads == 8


def test_scientific_notation_is_a_float():
    assert parse_yaml("a: 1e-3")["a"] == 1e-3
    assert parse_yaml("a: 3.0e-4")["a"] == 3e-4


def test_unknown_key_names_file_key_and_nearest():
    msg = _err(["optim.lrr=1e-3"])
    assert "--set" in msg and "optim.lrr" in msg and "optim.lr" in msg


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(f"base: {(__import__('pathlib').Path(TINY).resolve())}\ntrain:\n  stpes: 10\n")
    msg = _err([], p)
    assert "bad.yaml" in msg and "train.stpes" in msg and "train.steps" in msg


def test_unknown_mixer_key_nearest():
    msg = _err(["model.mixers.softmax.n_kv_head=2"])
    assert "model.mixers.softmax.n_kv_heads" in msg


def test_wrong_type_names_key():
    msg = _err(["optim.lr=abc"])
    assert "optim.lr" in msg and "abc" in msg
    assert "model.n_layers" in _err(["model.n_layers=2.5"])


def test_cross_field_checks():
    assert "n_kv_heads" in _err(["model.mixers.softmax.n_kv_heads=3"])
    assert "'kda' is not defined" in _err(["model.pattern=[softmax, kda]"])
    assert "grad_accum" in _err(["train.grad_accum=3"])
    assert "sliding_window" in _err(["model.mixers.softmax.sliding_window=100000"])
    assert "max_seq_len" in _err(["model.pos=learned", "model.max_seq_len=16"])
    assert "run.name" in _err(["run.name=a/b"])


def test_unknown_mixer_kind():
    assert "unknown kind" in _err(["model.mixers.attn={kind: softmx}"])


def test_all_problems_reported_at_once():
    msg = _err(["optim.lrr=1", "train.stepz=3"])
    assert "optim.lrr" in msg and "train.stepz" in msg


def test_missing_file_and_bad_yaml(tmp_path):
    assert "does not exist" in _err([], tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    assert "not valid YAML" in _err([], bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    assert "loops" in _err([], loop)


def test_bad_override_syntax():
    assert "key=value" in _err(["optim.lr"])


def test_dump_roundtrip(tmp_path):
    cfg = load_config(TINY, ["optim.lr=1e-3", "model.mixers.softmax.n_kv_heads=2"])
    assert cfg.to_dict()["model"]["mixers"]["softmax"]["n_kv_heads"] == 2
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p).to_dict() == cfg.to_dict()


def test_mesh_resolution():
    cfg = load_config(TINY, ["mesh.fsdp=2", "mesh.tensor=2"])
    assert resolved_mesh(cfg, 8) == (2, 2, 2)
    with pytest.raises(ConfigError):
        resolved_mesh(cfg, 6)


def test_all_shipped_configs_load():
    import pathlib

    for p in sorted(pathlib.Path("configs").rglob("*.yaml")):
        load_config(p)


def test_cli_reports_config_errors_without_traceback():
    out = subprocess.run([sys.executable, "-m", "lm.cli", "info", TINY, "--set", "optim.lrr=1"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "error:" in out.stderr and "optim.lr" in out.stderr
    assert "Traceback" not in out.stderr


def test_conv_confound_controls_match_their_baselines():
    """configs/tiny/kda_matched.yaml has the softmax baseline's parameter count (within 0.01%);
    cca_noconv.yaml is cca.yaml without conv weights."""
    from lm.info import model_info

    params = {n: model_info(load_config(f"configs/tiny/{n}.yaml"))["params"]
              for n in ("softmax", "kda", "kda_matched", "cca", "cca_noconv")}
    assert abs(params["kda_matched"] - params["softmax"]) <= 1e-4 * params["softmax"]
    assert params["kda"] - params["softmax"] > 80_000
    assert params["cca"] - params["cca_noconv"] == 19_968
