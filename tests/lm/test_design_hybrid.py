"""`attnlab design-hybrid`: layouts from the logged SP-KV densities of several seeds under a KV budget, per layer or
per head."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lm.config import dump_config, load_config
from lm.design_hybrid import DesignError, design, layer_costs, render

SPKV = "configs/tiny/spkv.yaml"  # 8 KV heads per layer, window 32, 256 tokens
HKV = 8


def _heads(layer) -> list[float]:
    return [float(layer)] * HKV if isinstance(layer, (int, float)) else list(layer)


def _run(root: Path, name: str, densities: list, config=SPKV, extra=(), step=50) -> Path:
    """A run directory holding an SP-KV config and one eval record with these densities (per layer: one value
    for all its KV heads, or one per head)."""
    cfg = load_config(config, [f"model.n_layers={len(densities)}", f"run.name={name}", *extra])
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    label = cfg.model.pattern[0]
    heads = {f"layer{i}.{label}": _heads(d) for i, d in enumerate(densities)}
    recs = [{"step": step, "loss": 3.0}, {"step": step, "eval_loss": 3.1, "spkv_density_heads": heads}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run


def _runs(tmp_path, *per_seed: list, **kw) -> list[Path]:
    """One run per seed (spkv-s0, -s1, ...), each with its densities; one list given: three seeds alike."""
    per_seed = per_seed if len(per_seed) > 1 else per_seed * 3
    return [_run(tmp_path, f"spkv-s{s}", d, **kw) for s, d in enumerate(per_seed)]


def test_the_densest_layers_stay_global_within_the_budget(tmp_path):
    # 4 layers; window 32 of 256: a local layer costs 1/8 of a global one. Budget 0.35 -> 1 global layer
    # (1 + 3/8 = 1.375 of 4 = 0.344); 0.6 -> 2 (2.25 / 4 = 0.5625).
    runs = _runs(tmp_path, [0.25, 0.8, 0.5, 0.85])
    one = design(runs, 0.35)
    assert one.layout == ["local", "local", "local", "global"] and one.global_heads[3] == list(range(HKV))
    assert one.cost == pytest.approx(1.375 / 4) and one.steps == [50, 50, 50]
    two = design(runs, 0.6)
    assert two.layout == ["local", "global", "local", "global"] and two.cost == pytest.approx(2.25 / 4)
    assert design(runs, 1.0).layout == ["global"] * 4
    # The designed config is a valid model: its own layer costs give the reported fraction.
    cfg = two.config
    assert cfg.model.pattern == two.layout and cfg.model.mixers["global"].spkv is None
    assert cfg.model.mixers["local"].sliding_window == 32 and cfg.run.name == "spkv-hybrid0.6"
    full = sum(layer_costs(load_config(None, raw={**cfg.to_dict(), "model": {**cfg.to_dict()["model"],
                                                                               "pattern": ["global"]}}), 256))
    assert sum(layer_costs(cfg, 256)) / full == pytest.approx(two.cost)
    text = render(two)
    assert text.startswith("# Designed by `attnlab design-hybrid") and "0.250, 0.800, 0.500, 0.850" in text
    assert "3 run(s) (evals at steps 50, 50, 50)" in text
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


def test_the_densest_heads_stay_global_per_head(tmp_path):
    """Strategy D: the 8 densest (layer, KV head) pairs of 32 stay global at the budget of one global layer; here
    they spread over three layers, so no layer is all global and one is all local."""
    dens = [[0.9, 0.1, 0.1, 0.1, 0.85, 0.1, 0.1, 0.1],
            [0.1] * 8,
            [0.8, 0.8, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1],
            [0.1, 0.1, 0.1, 0.1, 0.1, 0.7, 0.7, 0.75]]
    d = design(_runs(tmp_path, dens), 0.35, per_head=True)
    assert d.global_heads == [[0, 4], [], [0, 1, 2], [5, 6, 7]]
    assert d.layout == ["layer0", "local", "layer2", "layer3"]
    assert d.cost == pytest.approx((8 + 24 / 8) / 32)  # 8 global heads, 24 local ones at 1/8 of the cost
    mixers = d.config.model.mixers
    assert mixers["layer0"].local_heads == [1, 2, 3, 5, 6, 7] and mixers["layer0"].sliding_window == 32
    assert mixers["layer3"].local_heads == [0, 1, 2, 3, 4] and "global" not in mixers
    assert mixers["local"].local_heads is None and mixers["local"].sliding_window == 32
    full = sum(layer_costs(design(_runs(tmp_path / "b", dens), 1.0, per_head=True).config, 256))
    assert sum(layer_costs(d.config, 256)) / full == pytest.approx(d.cost)
    text = render(d)
    assert "--per-head" in text and "Layer 2 density per KV head: 0.800, 0.800, 0.800, 0.100" in text
    assert "global heads [0, 1, 2]" in text
    # One more global head than the budget allows costs (9 + 23/8) / 32 = 0.371.
    assert sum(len(h) for h in design(_runs(tmp_path / "c", dens), 0.372, per_head=True).global_heads) == 9


def test_densities_are_averaged_over_the_seeds(tmp_path):
    """Layer 0 is the densest in one seed only; the mean over three seeds puts layer 2 first."""
    runs = _runs(tmp_path, [0.85, 0.1, 0.6, 0.1], [0.2, 0.1, 0.6, 0.1], [0.2, 0.1, 0.6, 0.1])
    d = design(runs, 0.35)
    assert d.layout == ["local", "local", "global", "local"]
    assert d.densities == pytest.approx([0.85 / 3 + 0.4 / 3, 0.1, 0.6, 0.1])


def test_ties_go_to_the_earlier_layer_and_the_context_changes_the_count(tmp_path):
    runs = _runs(tmp_path, [0.8, 0.5, 0.8, 0.5])
    assert design(runs, 0.35).layout == ["global", "local", "local", "local"]
    # At 1024 tokens a 32-key window costs 1/32 of a global layer: 0.3 of 4 layers now buys 1 global (1.09/4).
    assert design(runs, 0.3, context=1024).layout.count("global") == 1
    assert design(runs, 0.3, context=256).layout == ["local"] * 4  # 1 + 3/8 of 4 = 0.34 > 0.3
    # Per head, equal densities go to the earlier layer, then the earlier head.
    assert design(runs, 0.3, context=1024, per_head=True).global_heads == [list(range(8)), [], [], []]


def test_linear_rest(tmp_path):
    d = design(_runs(tmp_path, [0.1, 0.8, 0.3, 0.2]), 0.4, rest="linear")
    assert d.layout[1] == "global" and set(d.layout) == {"global", "linear"}
    assert d.config.model.mixers["linear"].kind == "lightning" and d.cost <= 0.4
    with pytest.raises(DesignError, match="--per-head turns heads local"):
        design(_runs(tmp_path / "b", [0.1, 0.8, 0.3, 0.2]), 0.4, rest="linear", per_head=True)


@pytest.mark.parametrize("budget, needle", [(0.05, "is below the cost of a model with no global layer"),
                                            (1.5, "--budget must be a fraction in (0, 1]")])
def test_budget_errors(tmp_path, budget, needle):
    with pytest.raises(DesignError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        design(_runs(tmp_path, [0.5] * 4), budget)


def test_runs_it_cannot_design_from(tmp_path):
    runs = _runs(tmp_path / "ok", [0.5, 0.2])
    with pytest.raises(DesignError, match="2 run\\(s\\) given, --min-runs is 3"):
        design(runs[:2], 0.5)
    assert design(runs[:1], 0.5, min_runs=1).layout
    with pytest.raises(DesignError, match="given twice"):
        design([runs[0], runs[0], runs[1]], 0.5)
    with pytest.raises(DesignError, match="not a run directory"):
        design([tmp_path, *runs[1:]], 0.5)
    # A run that does not prune: its gates keep 0.95 of the older keys.
    dense = _run(tmp_path / "dense", "spkv-s3", [0.95, 0.95])
    with pytest.raises(DesignError, match=r"spkv-s3: its gates keep 0.950 of the older keys \(>= --max-density 0.9\)"):
        design([*runs[:2], dense], 0.5)
    assert design([*runs[:2], dense], 0.5, max_density=1.0).layout
    other = _run(tmp_path / "wide", "spkv-s4", [0.5, 0.2], extra=["model.d_model=256"])
    with pytest.raises(DesignError, match="spkv-s4 is not the model of"):
        design([*runs[:2], other], 0.5)
    plain = _runs(tmp_path / "plain", [0.5, 0.2], config="configs/tiny/softmax.yaml")
    with pytest.raises(DesignError, match="has no spkv"):
        design(plain, 0.5)
    few = _run(tmp_path / "few", "spkv-s5", [[0.5] * 2, [0.2] * 2])
    with pytest.raises(DesignError, match="2 densities per layer, the mixer has 8 KV heads"):
        design([*runs[:2], few], 0.5)
    (runs[2] / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval_loss": 2.0}) + "\n")
    with pytest.raises(DesignError, match="no eval with spkv_density_heads"):
        design(runs, 0.5)


def test_cli_writes_the_per_head_design(tmp_path, capsys):
    from lm.cli import main

    runs = [str(r) for r in _runs(tmp_path, [[0.9] + [0.1] * 7, 0.1, 0.1, [0.1] * 7 + [0.8]])]
    out = tmp_path / "heads.yaml"
    assert main(["design-hybrid", *runs, "--per-head", "--budget", "0.2", "--out", str(out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    # 2 global heads cost (2 + 30/8) / 32 = 0.180 of all-global, 3 cost 0.207.
    assert got["global_heads"] == [[0], [], [], [7]] and got["per_head"] and got["out"] == str(out)
    assert load_config(out).model.mixers["layer0"].local_heads == list(range(1, 8))
    assert main(["design-hybrid", *runs[:2], "--per-head", "--budget", "0.2"]) == 2
    assert "--min-runs is 3" in capsys.readouterr().err


def test_out_in_a_missing_directory_is_refused_not_created(tmp_path, capsys):
    from lm.cli import main

    runs = [str(r) for r in _runs(tmp_path, [0.2, 0.8])]
    missing = tmp_path / "typo" / "hybrid.yaml"
    assert main(["design-hybrid", *runs, "--budget", "0.6", "--out", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out {missing}: directory {missing.parent} does not exist; create it first (mkdir -p " \
                  f"{missing.parent}) or write somewhere else"
    assert not missing.parent.exists()
    assert main(["design-hybrid", *runs, "--budget", "0.6", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
