"""SP-KV on the tiny softmax model: gate density at τ = 0.5 and the eval-loss change it costs.

    python -m experiments.ablations.tiny_spkv [--seed 0] [--steps 100] [--taus 0.5 0.7 ...] [--out runs/ablation-tiny]

Two recipes, each against the same model without SP-KV at the same tokens:

- from scratch: configs/tiny/spkv.yaml trained for --steps (window 32; the last quarter frozen, its first 40%
  ramping the gate to the hard mask, the rest trained under it),
  with the paper's predictor settings (init_bias 5, lr_mult 5) and with the knobs that set density
  (init_bias, lr_mult, density_reg), against the tiny softmax run of the same budget;
- adapted (the paper's main recipe): the finished softmax run continued for another --steps with SP-KV
  (`--init-from`: every matching parameter loaded, the predictor's gates open), with the paper's settings
  and with the density regulariser, against the same softmax run continued for --steps without SP-KV.

Writes experiments/results/tiny_spkv.md. Shares run names and the output directory with
tiny_softmax_family, so the baseline softmax run is reused when that sweep already made it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.sweep import Run, report_head, run_all, save_records

SOFTMAX, SPKV = "configs/tiny/softmax.yaml", "configs/tiny/spkv.yaml"
P = "model.mixers.softmax.spkv"
# label -> SP-KV settings beyond configs/tiny/spkv.yaml
SCRATCH = {
    "spkv": (),
    "spkv_bias1": (f"{P}.init_bias=1.0",),
    "spkv_lr20": (f"{P}.lr_mult=20.0",),
    "spkv_reg": (f"{P}.density_reg=0.05",),
}
RESULTS = Path("experiments/results")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", default="runs/ablation-tiny")
    p.add_argument("--taus", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.95, 0.99],
                   help="thresholds to evaluate the spkv and spkv_adapted runs at (no retraining)")
    a = p.parse_args(argv)
    # The same common overrides as tiny_softmax_family, so its softmax and spkv runs are shared.
    common = (f"train.steps={a.steps}", f"optim.warmup_steps={min(30, a.steps // 10)}", "train.ckpt_every=0",
              "wandb.mode=disabled", "train.log_every=50")
    # The paper's schedule, scaled: the predictor frozen for the last quarter, the gate hardened over the first
    # 40% of that span, and the rest trained under the exact hard mask.
    freeze = max(a.steps // 4, 1)
    anneal = (f"{P}.anneal.freeze_steps={freeze}", f"{P}.anneal.ramp_steps={max(freeze * 2 // 5, 1)}")
    base_dir = str(Path(a.out) / f"softmax-s{a.seed}")
    runs = [Run("softmax", SOFTMAX, (), a.seed)]
    runs += [Run(label, SPKV, anneal + extra, a.seed) for label, extra in SCRATCH.items()]
    runs += [Run("softmax_continued", SOFTMAX, (), a.seed, init_from=base_dir),
             Run("spkv_adapted", SPKV, anneal, a.seed, init_from=base_dir),
             Run("spkv_adapted_reg", SPKV, anneal + SCRATCH["spkv_reg"], a.seed, init_from=base_dir)]
    records = run_all(runs, a.out, common=common)
    sweep = threshold_sweep(records, a)
    save_records({"runs": records, "threshold_sweep": sweep}, RESULTS / "tiny_spkv.json")
    write_report(records, a, sweep)


def threshold_sweep(records: list[dict], a) -> list[dict]:
    """Eval loss, density and compression of the spkv runs at other thresholds τ (the same weights), on the
    held-out batches the runs' own evals used (train.eval_steps of them), so the baselines' losses compare."""
    from lm.config import load_config
    from lm.eval import evaluate

    out = []
    for r in records:
        if r["label"] not in ("spkv", "spkv_adapted"):
            continue
        run_dir = Path(a.out) / f"{r['label']}-s{r['seed']}"
        n_batches = load_config(run_dir / "config.yaml").train.eval_steps
        for tau in a.taus:
            res = evaluate(run_dir, max_batches=n_batches, overrides=[f"{P}.threshold={tau}"])
            out.append({"label": r["label"], "tau": tau, **{k: res[k] for k in (
                "eval_loss", "spkv_density", "spkv_compression")}})
            print(json.dumps(out[-1]), flush=True)
    return out


def write_report(records: list[dict], a, sweep: list[dict]) -> None:
    by = {r["label"]: r for r in records}
    rows = []
    for label, base in [*((lbl, "softmax") for lbl in SCRATCH), ("spkv_adapted", "softmax_continued"),
                        ("spkv_adapted_reg", "softmax_continued")]:
        r, b = by[label], by[base]
        settings = " ".join(o.split(".spkv.")[-1] for o in r["overrides"] if "anneal" not in o) or "defaults"
        rows.append(f"| {label} | {settings} | {r['tokens'] * (2 if r['init_from'] else 1):,} | "
                    f"{r['spkv_density']:.3f} | {r['spkv_compression']:.2f}x | {r['eval_loss']:.4f} | "
                    f"{b['eval_loss']:.4f} ({base}) | {100 * (r['eval_loss'] / b['eval_loss'] - 1):+.2f}% |")
    heads = by["spkv"].get("spkv_density_heads", {})
    head_lines = "\n".join(f"| {layer} | " + " | ".join(f"{d:.2f}" for d in dens) + " |"
                           for layer, dens in heads.items())
    n_heads = max((len(d) for d in heads.values()), default=0)
    tau_rows = []
    for t in sweep:
        base = by["softmax" if t["label"] == "spkv" else "softmax_continued"]["eval_loss"]
        tau_rows.append(f"| {t['label']} | {t['tau']:.2f} | {t['spkv_density']:.3f} | {t['spkv_compression']:.2f}x | "
                        f"{t['eval_loss']:.4f} | {100 * (t['eval_loss'] / base - 1):+.2f}% |")
    (RESULTS / "tiny_spkv.md").write_text(
        report_head("SP-KV on the tiny softmax model", "experiments.ablations.tiny_spkv") +
        "Model: configs/tiny/softmax.yaml (d_model 192, 4 layers, 8 heads, seq 256, batch 16) with SP-KV on "
        "every layer: local window 32, τ = 0.5, predictor d_model → 48 → 8 KV heads. The predictor is frozen for "
        "the last quarter of the steps; over the first 40% of that span the gate ramps to the hard mask, and the "
        "rest trains under exactly the mask eval and the pruned cache use. Density is the share of keys outside "
        "the window with u ≥ τ over every layer and KV head of the eval split; compression is the dense "
        "cache's entries over the pruned cache's at the end of each 256-token sequence (at most 8x here). "
        "Eval losses of SP-KV runs use the hard gate, which is what decoding with the pruned cache computes "
        "(tested). 'tokens' counts every token the model has trained on; an adapted run starts from the "
        "finished softmax run.\n\n"
        "| run | settings | tokens | density | cache compression | eval loss (nats) | baseline | change |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "The threshold τ at inference, on the same weights (trained and annealed at τ = 0.5); the change is "
        "against the run's baseline above:\n\n"
        "| run | τ | density | cache compression | eval loss (nats) | change |\n|---|---|---|---|---|---|\n"
        + "\n".join(tau_rows) + "\n\n"
        "Per layer and KV head (run `spkv`, τ = 0.5):\n\n"
        "| layer | " + " | ".join(f"head {h}" for h in range(n_heads)) + " |\n"
        "|---|" + "---|" * n_heads + "\n" + head_lines + "\n\n"
        "Raw per-run records (with eval curves): `tiny_spkv.json`.\n")


if __name__ == "__main__":
    main()
