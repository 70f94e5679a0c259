"""Static facts about a config's model, computed without training or allocating parameters; for a trained SP-KV
run, a decode-cache capacity from the densities it measured."""
from __future__ import annotations

import math
from pathlib import Path

import jax

from lm.config import Config
from lm.model import abstract_model, count_params
from lm.tracking import read_metrics

# The suggested store holds the densest head's measured share of older keys plus this much: the share is a mean
# over the eval's sequences, and a denser sequence would evict (counted by the cache) beyond it.
CAPACITY_HEADROOM = 0.25


def model_info(cfg: Config) -> dict:
    mdef, shapes = abstract_model(cfg)
    model = mdef.merge(shapes)
    T = cfg.data.seq_len
    n = count_params(shapes)
    emb = int(shapes["embed"]["embedding"].size)
    if "pos_embed" in shapes:
        emb += int(shapes["pos_embed"]["embedding"].size)
    fwd = model.flops_per_token(T)
    kv32 = model.cache_bytes_per_token()
    return {
        "params": n,
        "params_non_embedding": n - emb,
        "layers": [f"{b.name}:{type(b.mixer).__name__}" for b in model.blocks],
        "seq_len": T,
        "flops_per_token": fwd,
        "train_flops_per_token": 3 * fwd,
        "kv_cache_bytes_per_token": kv32,
        "kv_cache_dtype": cfg.model.dtype,
        "state_bytes_per_sequence": model.state_bytes(),
        "backend": jax.default_backend(),
    }


def spkv_capacity(run_dir: Path, cfg: Config) -> dict:
    """Per SP-KV mixer of a run, a `spkv.cache.capacity` from its newest eval's per-head densities (the kept share
    of the keys older than the window): the densest head's share plus 25%, rounded up to 0.01 and at most 1, with
    the keys and values that cache holds at data.seq_len against a dense cache. {} without SP-KV densities."""
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if isinstance(r.get("spkv_density_heads"), dict)] \
        if (run_dir / "metrics.jsonl").is_file() else []
    if not evals:
        return {}
    heads, m, T = evals[-1]["spkv_density_heads"], cfg.model, cfg.data.seq_len
    out = {}
    for name, mixer in m.mixers.items():
        spkv = getattr(mixer, "spkv", None)
        labels = [f"layer{i}.{name}" for i in range(m.n_layers) if m.mixer_for_layer(i)[0] == name]
        rows = [(d, label, h) for label in labels if label in heads for h, d in enumerate(heads[label])]
        if spkv is None or not rows:
            continue
        density, label, head = max(rows)
        share = min(math.ceil(density * (1 + CAPACITY_HEADROOM) * 100) / 100, 1.0)
        window = min(spkv.window, T)
        out[name] = {"step": int(evals[-1]["step"]), "densest_head": f"{label} head {head}", "density": density,
                     "capacity": share, "set": f"model.mixers.{name}.spkv.cache.capacity={share}",
                     "kv_vs_dense": (window + math.ceil(share * (T - window))) / T}
    return out
