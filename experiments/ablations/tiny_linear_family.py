"""The linear family at CPU scale: tiny KDA, lightning and the two hybrids against the tiny softmax baseline.

    python -m experiments.ablations.tiny_linear_family [--seeds 0] [--steps 100] [--out runs/ablation-tiny]

trains configs/tiny/{softmax,kda,lightning,kimi_hybrid,minimax_hybrid}.yaml on the embedded stdlib corpus
with the same token budget and seeds, then writes experiments/results/tiny_linear_family.md: params,
recurrent-state and KV-cache bytes, training tokens/s, and final eval loss against softmax at equal
tokens. It shares its output directory and run names with tiny_softmax_family, so a softmax run that the
other sweep already finished with the same steps and seed is reused, not retrained.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from experiments.sweep import Run, budget, report_head, run_all, save_records, summarize

VARIANTS = {
    "softmax": "configs/tiny/softmax.yaml",
    "kda": "configs/tiny/kda.yaml",
    "lightning": "configs/tiny/lightning.yaml",
    "kimi_hybrid": "configs/tiny/kimi_hybrid.yaml",
    "minimax_hybrid": "configs/tiny/minimax_hybrid.yaml",
}
RESULTS = Path("experiments/results")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--only", nargs="+", default=None, help="a subset of the variant labels")
    p.add_argument("--out", default="runs/ablation-tiny")
    a = p.parse_args(argv)
    labels = [v for v in VARIANTS if a.only is None or v in a.only]
    # The same common overrides as tiny_softmax_family, so the softmax runs are shared.
    common = (f"train.steps={a.steps}", f"optim.warmup_steps={min(30, a.steps // 10)}", "train.ckpt_every=0",
              "wandb.mode=disabled", "train.log_every=50")
    records = run_all([Run(label, VARIANTS[label], (), seed) for seed in a.seeds for label in labels], a.out,
                      common=common)
    save_records(records, RESULTS / "tiny_linear_family.json")
    write_report(records, a)


def _train_tokens_per_s(run_dir: Path) -> float | None:
    """Median logged training throughput of a run (the first log line includes no compile time either)."""
    from lm.tracking import read_metrics

    tps = sorted(r["tokens_per_s"] for r in read_metrics(run_dir / "metrics.jsonl") if "tokens_per_s" in r)
    return tps[len(tps) // 2] if tps else None


def write_report(records: list[dict], a) -> None:
    summary = summarize(records)
    base = summary.get("softmax")
    speed = {}
    for r in records:
        tps = _train_tokens_per_s(Path(a.out) / f"{r['label']}-s{r['seed']}")
        if tps is not None:
            speed.setdefault(r["label"], []).append(tps)
    rows = []
    for label, s in summary.items():
        rel = f"{100 * (s['mean'] / base['mean'] - 1):+.2f}%" if base else "n/a"
        spread = f" ± {s['spread'] / 2:.4f}" if s["n"] > 1 else ""
        tps = f"{sum(speed[label]) / len(speed[label]):,.0f}" if label in speed else "n/a"
        rows.append(f"| {label} | {s['params']:,} | {s['kv_cache_bytes_per_token']:,} | "
                    f"{s['state_bytes_per_sequence']:,} | {tps} | {s['mean']:.4f}{spread} | {rel} |")
    (RESULTS / "tiny_linear_family.md").write_text(
        report_head("Linear-family variants at CPU scale, against softmax at equal tokens", "experiments.ablations.tiny_linear_family") +
        f"Every variant: configs/tiny/ (the softmax baseline's data, batch 16 x seq 256, schedule and budget: "
        f"{budget(records, a.steps)}), stdlib corpus, byte tokenizer. kda and lightning "
        f"use every layer for their mixer (4 layers, d_model 192, no positions); kimi_hybrid is 3 KDA : 1 NoPE "
        f"softmax over 4 layers; minimax_hybrid is 7 lightning : 1 softmax over 8 layers at d_model 128. Eval "
        f"loss is nats per byte on the held-out split (16 batches). KV bytes are per token (softmax layers, "
        f"fp32); state bytes are the fixed recurrent state per sequence (linear layers, fp32). tokens/s is the "
        f"median logged training throughput on this 2-core machine, which may have run other jobs at the same "
        f"time: compare it within this table only.\n\n"
        f"| variant | params | KV bytes/token | state bytes/seq | train tokens/s | eval loss (nats) | vs softmax |\n"
        f"|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "Raw per-run records (with eval curves): `tiny_linear_family.json`.\n")


if __name__ == "__main__":
    main()
