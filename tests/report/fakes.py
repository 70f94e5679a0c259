"""Run directories and sweep manifests with hand-written metrics, for testing reports without training."""
from __future__ import annotations

import json
from pathlib import Path

from lm.config import dump_config, load_config

CONFIGS = {"softmax": ("configs/tiny/softmax.yaml", []),
           "mqa": ("configs/tiny/softmax.yaml", ["model.mixers.softmax.n_kv_heads=1"]),
           "kda": ("configs/tiny/kda.yaml", []),
           "gqa4": ("configs/tiny/softmax.yaml", ["model.mixers.softmax.n_kv_heads=2"])}
# Final eval loss per variant and seed. Against softmax, mqa is -0.1 on every seed; kda is +0.05, -0.1, +0.1 (a tie).
FINAL = {"softmax": [2.0, 2.1, 2.5], "mqa": [1.9, 2.0, 2.4], "kda": [2.05, 2.0, 2.6]}
DENSITY = [0.9, 0.8, 0.7]  # mqa's extra eval metric, one per seed
STEPS = 100  # train.steps; evals at 50 and 100


def write_run(root: Path, variant: str, seed: int, final: float | None, *, last_step: int = STEPS) -> Path:
    """runs/<variant>-s<seed>/ with config.yaml and metrics.jsonl: train lines every 50 steps up to `last_step`,
    evals at step 50 (final + 0.5) and at `last_step` (final) unless `final` is None."""
    path, overrides = CONFIGS[variant]
    name = f"{variant}-s{seed}"
    cfg = load_config(path, [*overrides, f"run.name={name}", f"run.out_dir={root}", f"run.seed={seed}",
                             f"train.steps={STEPS}", "train.eval_every=50"])
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    rows = []
    for step in range(50, last_step + 1, 50):
        rows.append({"step": step, "loss": 3.0 - step / 100, "lr": 1e-3})
        if final is None:
            continue
        ev = {"step": step, "eval_loss": final + (0.5 if step < last_step else 0.0), "eval_ppl": 8.0,
              "eval_acc": 0.4, "eval_tokens": 65536, "eval_bpb": 3.0}
        if variant == "mqa":
            ev.update({"spkv_density": DENSITY[seed], "spkv_density/layer0.softmax": 1.0,
                       "spkv_density_heads": {"layer0.softmax": [1.0, 0.5]}})
        rows.append(ev)
        if variant == "mqa" and step == last_step:
            rows.append({"step": step, "spkv_compression": 1.5})  # a metric logged on a line of its own
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def write_sweep(tmp: Path, name: str = "demo") -> Path:
    """A sweep of softmax, mqa and kda over seeds 0-2, plus gqa4-s0 (logged train steps, no eval yet) and
    gqa4-s1 (pending, no directory)."""
    runs_root, sweep_dir = tmp / "runs", tmp / "sweeps" / name
    runs = []
    for seed in range(3):
        for variant, finals in FINAL.items():
            runs.append((variant, seed, write_run(runs_root, variant, seed, finals[seed])))
    runs.append(("gqa4", 0, write_run(runs_root, "gqa4", 0, None, last_step=50)))
    runs.append(("gqa4", 1, runs_root / "gqa4-s1"))
    sweep_dir.mkdir(parents=True)
    manifest = {"name": name, "group": f"sweep-{name}", "baseline": "softmax", "description": "A test sweep.",
                "spec": "sweep.yaml", "seeds": [0, 1, 2],
                "runs": [{"name": f"{v}-s{s}", "variant": v, "seed": s, "config": CONFIGS[v][0],
                          "overrides": CONFIGS[v][1], "run_dir": str(d),
                          "status": "pending" if v == "gqa4" and s == 1 else "finished"} for v, s, d in runs]}
    (sweep_dir / "sweep.json").write_text(json.dumps(manifest, indent=1))
    return sweep_dir
