"""`attnlab design-hybrid`: layouts from logged SP-KV densities under a KV budget."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lm.config import dump_config, load_config
from lm.design_hybrid import DesignError, design, layer_costs, render

SPKV = "configs/tiny/spkv.yaml"


def _run(tmp_path, densities: list[list[float]], config=SPKV, extra=()):
    """A run directory holding an SP-KV config and one eval record with these per-layer head densities."""
    cfg = load_config(config, [f"model.n_layers={len(densities)}", *extra])
    run = tmp_path / "src"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    name = cfg.model.pattern[0]
    heads = {f"layer{i}.{name}": d for i, d in enumerate(densities)}
    recs = [{"step": 50, "loss": 3.0}, {"step": 50, "eval_loss": 3.1, "spkv_density_heads": heads}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run


def test_the_densest_layers_stay_global_within_the_budget(tmp_path):
    # 4 layers; window 32 of 256: a local layer costs 1/8 of a global one. Budget 0.35 -> 1 global layer
    # (1 + 3/8 = 1.375 of 4 = 0.344); 0.6 -> 2 (2.25 / 4 = 0.5625).
    run = _run(tmp_path, [[0.2, 0.3], [0.9, 0.7], [0.5, 0.5], [0.95, 0.9]])
    one = design(run, 0.35)
    assert one.layout == ["local", "local", "local", "global"]  # layer 3 is the densest (0.925)
    assert one.cost == pytest.approx(1.375 / 4) and one.step == 50
    two = design(run, 0.6)
    assert two.layout == ["local", "global", "local", "global"] and two.cost == pytest.approx(2.25 / 4)
    assert design(run, 1.0).layout == ["global"] * 4
    # The designed config is a valid model: its own layer costs give the reported fraction.
    cfg = two.config
    assert cfg.model.pattern == two.layout and cfg.model.mixers["global"].spkv is None
    assert cfg.model.mixers["local"].sliding_window == 32
    full = sum(layer_costs(load_config(None, raw={**cfg.to_dict(), "model": {**cfg.to_dict()["model"],
                                                                               "pattern": ["global"]}}), 256))
    assert sum(layer_costs(cfg, 256)) / full == pytest.approx(two.cost)
    text = render(two)
    assert text.startswith("# Designed by `attnlab design-hybrid") and "0.250, 0.800, 0.500, 0.925" in text
    reloaded = tmp_path / "designed.yaml"
    reloaded.write_text(text)
    assert load_config(reloaded).model.pattern == two.layout
    # On a base config: only the layout is written, and it loads to the same model.
    base = str(Path("configs/tiny/softmax.yaml").resolve())
    small = render(two, base=base)
    assert f"base: {base}" in small and "data:" not in small
    (tmp_path / "small.yaml").write_text(small)
    on_base = load_config(tmp_path / "small.yaml")
    assert on_base.model.pattern == two.layout and on_base.model.mixers["local"].sliding_window == 32
    assert sum(layer_costs(on_base, 256)) == sum(layer_costs(cfg, 256))


def test_ties_go_to_the_earlier_layer_and_the_context_changes_the_count(tmp_path):
    run = _run(tmp_path, [[1.0], [0.5], [1.0], [0.5]])
    assert design(run, 0.35).layout == ["global", "local", "local", "local"]
    # At 1024 tokens a 32-key window costs 1/32 of a global layer: 0.3 of 4 layers now buys 1 global (1.09/4).
    assert design(run, 0.3, context=1024).layout.count("global") == 1
    assert design(run, 0.3, context=256).layout == ["local"] * 4  # 1 + 3/8 of 4 = 0.34 > 0.3


def test_linear_rest(tmp_path):
    run = _run(tmp_path, [[0.1], [0.8], [0.3], [0.2]])
    d = design(run, 0.4, rest="linear")
    assert d.layout[1] == "global" and set(d.layout) == {"global", "linear"}
    assert d.config.model.mixers["linear"].kind == "lightning" and d.cost <= 0.4


@pytest.mark.parametrize("densities, budget, extra, needle", [
    ([[0.5]] * 4, 0.05, (), "is below the cost of a model with no global layer"),
    ([[0.5]] * 4, 1.5, (), "--budget must be a fraction in (0, 1]"),
])
def test_budget_errors(tmp_path, densities, budget, extra, needle):
    with pytest.raises(DesignError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        design(_run(tmp_path, densities, extra=extra), budget)


def test_runs_it_cannot_design_from(tmp_path):
    with pytest.raises(DesignError, match="not a run directory"):
        design(tmp_path, 0.5)
    plain = _run(tmp_path, [[0.5]] * 2, config="configs/tiny/softmax.yaml")
    with pytest.raises(DesignError, match="has no spkv"):
        design(plain, 0.5)
    (tmp_path / "src" / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval_loss": 2.0}) + "\n")
    (tmp_path / "src" / "config.yaml").write_text(dump_config(load_config(SPKV, ["model.n_layers=2"])))
    with pytest.raises(DesignError, match="no eval with spkv_density_heads"):
        design(tmp_path / "src", 0.5)


def test_out_in_a_missing_directory_is_refused_not_created(tmp_path, capsys):
    from lm.cli import main

    run = _run(tmp_path, [[0.2], [0.9]])
    missing = tmp_path / "typo" / "hybrid.yaml"
    assert main(["design-hybrid", str(run), "--budget", "0.6", "--out", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out {missing}: directory {missing.parent} does not exist; create it first (mkdir -p " \
                  f"{missing.parent}) or write somewhere else"
    assert not missing.parent.exists()
    assert main(["design-hybrid", str(run), "--budget", "0.6", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
