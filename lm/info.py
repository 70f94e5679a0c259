"""Static facts about a config's model, computed without training or allocating parameters."""
from __future__ import annotations

import jax

from lm.config import Config
from lm.model import abstract_model, count_params


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
