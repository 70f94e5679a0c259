"""impl=pallas (the kernels, interpreted on the CPU) trains tiny configs (softmax family, lightning, kda), shrunk, with
the same losses as impl=xla from the same seed and batches: the kernels' forward and backward inside the real
train and eval steps. The full-size run is `experiments/kernels/train_parity.py`."""
from __future__ import annotations

import numpy as np
import pytest

from lm.config import load_config
from lm.tracking import read_metrics
from lm.train import train
from tests.lm.conftest import tiny_overrides

# config -> its mixer's name in the file (shrunk to 2 heads of head dim 16; GQA/K=V/SP-KV/CCA kept).
CONFIGS = {"share_kv": "softmax", "spkv": "softmax", "cca": "cca", "lightning": "lightning", "kda": "kda"}


def _losses(name, impl, store, tmp_path):
    extra = {"kernels.impl": impl, "train.steps": 3, "optim.warmup_steps": 1, "model.n_layers": 1,
             f"model.mixers.{CONFIGS[name]}.n_heads": 2}
    if name == "cca":
        extra["model.mixers.cca.n_kv_heads"] = 1
    if name == "spkv":  # the last step trains under the hard 0/-inf gate
        extra.update({"model.mixers.softmax.spkv.window": 8, "model.mixers.softmax.spkv.anneal.freeze_steps": 1,
                      "model.mixers.softmax.spkv.anneal.ramp_steps": 1})
    cfg = load_config(f"configs/tiny/{name}.yaml", tiny_overrides(store, tmp_path, f"{name}-{impl}", **extra))
    res = train(cfg)
    rows = read_metrics(res.run_dir / "metrics.jsonl")
    return [r["loss"] for r in rows if "loss" in r] + [res.last_eval["eval_loss"]]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pallas_trains_like_xla(name, small_store, tmp_path):
    xla = _losses(name, "xla", small_store, tmp_path)
    pallas = _losses(name, "pallas", small_store, tmp_path)
    assert len(xla) == 4
    np.testing.assert_allclose(pallas, xla, rtol=1e-5, err_msg=f"{name}: step losses and eval loss")
