"""`make demo`: train a config on CPU, evaluate it, and compare with the corpus's unigram entropy."""
from __future__ import annotations

import math
import shlex
import time
from pathlib import Path

from lm.config import load_config
from lm.train import open_data, train


def unigram_bits_per_byte(store) -> float:
    """Entropy of the training split's token distribution (recorded by `prepare`), in bits per byte of text."""
    bits_per_token = store.meta["splits"]["train"]["unigram_entropy_bits_per_token"]
    return bits_per_token * store.n_tokens("train") / max(store.n_bytes("train"), 1)


def suggested_command(run_dir: str | Path, cfg, prompt: str = "def ") -> str:
    """The `attnlab generate` command the demo suggests: sampling (the default), as many new tokens as fit the
    context the model was trained on (at most 200; a byte-level prompt is one token per byte)."""
    n = max(1, min(200, cfg.data.seq_len - len(prompt.encode())))
    return f"attnlab generate {shlex.quote(str(run_dir))} --prompt {shlex.quote(prompt)} --max-new-tokens {n}"


def demo(config_path: str, overrides: list[str]) -> int:
    cfg = load_config(config_path, overrides)
    ds = open_data(cfg)
    t0 = time.perf_counter()
    res = train(cfg)
    minutes = (time.perf_counter() - t0) / 60
    if res.status not in ("finished", "already_finished"):
        print(f"demo: training stopped ({res.status}): {res.message}")
        return 3
    if res.last_eval is None:
        from lm.eval import evaluate

        res.last_eval = evaluate(res.run_dir, as_in_training=True)
    h = unigram_bits_per_byte(ds.store)
    bpb = res.last_eval["eval_bpb"]
    print(f"demo: {cfg.run.name} trained {res.step} steps in {minutes:.1f} min")
    print(f"demo: final eval loss {bpb:.3f} bits/byte  vs  unigram entropy of the corpus {h:.3f} bits/byte "
          f"({100 * (1 - bpb / h):.0f}% lower)")
    print(f"demo: metrics in {res.run_dir}/metrics.jsonl; try  {suggested_command(res.run_dir, cfg)}")
    return 0 if math.isfinite(bpb) else 3
