"""The per-head design-hybrid experiment: its source runs are the finished seeds of text_spkv_2048's SP-KV variant
(seeds 1-5 at the lr chosen on seed 0), its design file is a per-head layout within one global layer's
budget, and its sweep compares that layout with the global layer at every position at 2048 tokens."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from experiments.ablations import design_hybrid_heads as exp
from lm.config import dump_config, load_config
from lm.design_hybrid import layer_costs
from lm.sweep.local import manifest, write_manifest
from lm.sweep.spec import load_sweep
from lm.sweep.tune import resolved


def _spec_in(tmp_path, spec: str, replace: dict[str, str] | None = None) -> Path:
    """A copy of `spec` whose runs go under tmp_path (and whose named files are replaced)."""
    text = Path(spec).read_text().replace("out_dir: runs/sweeps", f"out_dir: {tmp_path / 'runs'}")
    for old, new in (replace or {}).items():
        text = text.replace(old, new)
    path = tmp_path / Path(spec).name
    path.write_text(text)
    return path


def _finish(run_dir: Path, cfg, eval_loss: float, densities: list[list[float]] | None = None) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    rec = {"step": cfg.train.steps, "eval_loss": eval_loss}
    if densities is not None:
        rec["spkv_density_heads"] = {f"layer{i}.softmax": d for i, d in enumerate(densities)}
    (run_dir / "metrics.jsonl").write_text(json.dumps(rec) + "\n")


def _densities(seed: int) -> list[list[float]]:
    """Per (layer, head): layer 1's heads 2 and 5 and layer 3's head 0 dense in every seed, the rest sparse."""
    rng = np.random.default_rng(seed)
    dens = rng.uniform(0.05, 0.3, (4, 8))
    dens[1, [2, 5]] = dens[3, 0] = 0.8
    return dens.round(4).tolist()


def test_source_runs_are_the_finished_seeds(tmp_path):
    """The SP-KV runs of seeds 1-5 at the lr chosen on seed 0 (whose tuning runs are not among them)."""
    spec = _spec_in(tmp_path, exp.SOURCE)
    with pytest.raises(SystemExit, match="0 of 5 seeds of spkv have finished"):
        exp.source_runs(str(spec))
    sweep = load_sweep(spec)
    statuses = {}
    for r in sweep.runs:  # tuning runs: lr 2e-3 is best for spkv
        if r.variant.startswith("spkv-"):
            _finish(Path(r.run_dir), r.cfg, 1.0 if "lr0.002" in r.name else 2.0, _densities(r.seed))
            statuses[r.name] = "finished"
    chosen = resolved(sweep, statuses)
    for r in chosen.runs:
        if r.variant == "spkv" and r.stage != "tune" and not r.reuses:
            _finish(Path(r.run_dir), r.cfg, 1.0, _densities(r.seed))
            statuses[r.name] = "finished"
    write_manifest(chosen.manifest_path, manifest(chosen, statuses))
    runs = exp.source_runs(str(spec))
    assert [p.name for p in runs] == ["spkv-s1", "spkv-s2", "spkv-s3", "spkv-s4", "spkv-s5"]


def test_the_design_and_its_sweep(tmp_path):
    """The per-head design from 5 seeds keeps the heads dense in every seed global, within one global layer's
    budget; the sweep then holds it and the global layer at each of the 4 positions, all at 2048 tokens with
    128-key windows, every fixed layout at exactly that budget."""
    src = load_config("configs/tiny/spkv.yaml", ["data.seq_len=2048", "model.mixers.softmax.spkv.window=128"])
    runs = []
    for seed in range(5):
        cfg = load_config(None, raw={**src.to_dict(), "run": {**src.to_dict()["run"], "name": f"spkv-s{seed}"}})
        _finish(tmp_path / f"spkv-s{seed}", cfg, 1.0, _densities(seed))
        runs.append(tmp_path / f"spkv-s{seed}")
    out = tmp_path / "configs" / "hybrid2048_heads.yaml"
    out.parent.mkdir()
    heads, layers = exp.write_design(runs, out)
    budget = (1 + 3 * 128 / 2048) / 4
    assert heads.budget == pytest.approx(budget, abs=1e-6) and heads.cost <= budget
    # 8 of 32 heads fit: (8 + 24 * 128/2048) / 32 = 0.297; the three dense in every seed are among them.
    assert sum(map(len, heads.global_heads)) == 8
    assert {2, 5} <= set(heads.global_heads[1]) and 0 in heads.global_heads[3]
    assert layers.layout.count("global") == 1
    position = layers.layout.index("global")
    text = out.read_text()
    assert f"keeps layer {position} global" in text and f"variant global{position} of the sweep" in text
    assert load_config(out).model.pattern == heads.layout

    sweep = load_sweep(_spec_in(tmp_path, exp.SPEC, {"configs/tiny/hybrid2048_heads.yaml": str(out)}))
    assert sweep.baseline == "heads" and sweep.seeds == (1, 2, 3, 4, 5) and sweep.tune.key == "optim.lr"
    by = {r.variant.rsplit("-lr", 1)[0]: r.cfg for r in sweep.runs if r.name.endswith("lr0.002-s0")}
    assert sorted(by) == ["global0", "global1", "global2", "global3", "heads"]
    dense = sum(layer_costs(load_config("configs/tiny/softmax.yaml"), 2048))
    for label, cfg in by.items():
        assert cfg.data.seq_len == 2048 and cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len >= 2_000_000
        windows = {m.sliding_window for m in cfg.model.mixers.values()} - {None}
        assert windows == {128}, label
        cost = sum(layer_costs(cfg, 2048)) / dense
        if label == "heads":
            assert cost == pytest.approx(heads.cost)
        else:
            assert cost == pytest.approx(budget)
            assert cfg.model.pattern[int(label[-1])] == "global" and cfg.model.pattern.count("global") == 1
    assert yaml.safe_load(Path(exp.SPEC).read_text())["configs"]["heads"] == str(exp.DESIGNED)
