"""Where a train step's time goes: the step cut into parts that are each timed on their own.

    python -m experiments.bench.step_parts configs/bench/cpu_d512_l8.yaml [--reps 3] [--set KEY=VALUE ...]

Parts, each jit-compiled alone on the config's shapes (uniformly random tokens):

- forward: the mean token loss;
- forward+backward: its value and gradients (what `make_train_step` differentiates);
- optimizer: the AdamW update and its application on parameter-shaped gradients;
- full step: `make_train_step` (forward, backward, clipping, non-finite guard, optimizer);
- attention ops: forward+backward of every layer's `softmax_attention` call alone, on the layer's q/k/v
  shapes, summed over layers;
- matmuls: forward+backward of the dense layers alone (the projections, MLP and head as plain
  [B*T, d_in] x [d_in, d_out] products, three per layer and pass), summed.

The remainder of forward+backward after attention and matmuls is the elementwise work (norms, RoPE,
activations, residuals, the cross-entropy). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from attention import ops
from lm.bench.ops import median_time
from lm.bench.step import machine
from lm.config import load_config
from lm.model import token_losses
from lm.train.setup import build
from lm.train.step import make_train_step


def step_parts(config: str, overrides: list[str], reps: int = 3) -> dict:
    cfg = load_config(config, overrides)
    setup = build(cfg)
    state = jax.jit(setup.fresh_state)()
    params = state["params"]
    B, T, V, d = cfg.data.batch_size, cfg.data.seq_len, cfg.model.vocab_size, cfg.model.d_model
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, T + 1)), jnp.int32)

    def loss(p):
        logits = setup.mdef.merge(p)(tokens[:, :-1])
        return jnp.mean(token_losses(logits, tokens[:, 1:]))

    out = {"config": config, "overrides": overrides, "reps": reps}
    out["forward_s"] = median_time(jax.jit(loss), (params,), reps)
    out["forward_backward_s"] = median_time(jax.jit(jax.value_and_grad(loss)), (params,), reps)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)

    def opt(p, g, s):
        updates, s = setup.tx.update(g, s, p)
        return jax.tree.map(jnp.add, p, updates), s

    out["optimizer_s"] = median_time(jax.jit(opt), (params, grads, state["opt"]), reps)
    step = jax.jit(make_train_step(cfg, setup.mdef, setup.tx, setup.schedule))
    out["full_step_s"] = median_time(step, (state, {"tokens": tokens}), reps)

    # Attention: every softmax layer's op call on its shapes (heads and head dim from the mixer config).
    attn = 0.0
    key = jax.random.PRNGKey(0)
    for block in setup.mdef.merge(params).blocks:
        mixer = block.mixer
        if not hasattr(mixer, "H"):
            continue
        q = jax.random.normal(key, (B, T, mixer.H, mixer.hd))
        kv = jax.random.normal(key, (B, T, mixer.Hkv, mixer.hd))
        f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(ops.softmax_attention(q, k, v, causal=True, impl=cfg.kernels.impl)),
                             argnums=(0, 1, 2)))
        attn += median_time(f, (q, kv, kv), reps)
    out["attention_ops_s"] = attn

    # Dense layers: each [B*T, d_in] x [d_in, d_out] weight, forward and both backward products.
    shapes = [tuple(x.shape) for x in jax.tree.leaves(params) if x.ndim == 2 and V not in x.shape]
    shapes.append((d, V))  # the output head (tied or not)
    mm = 0.0
    for shape in sorted(set(shapes)):
        n = shapes.count(shape)
        x = jax.random.normal(key, (B * T, shape[0]))
        w = jax.random.normal(key, shape)
        f = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.dot(x, w)), argnums=(0, 1)))
        mm += n * median_time(f, (x, w), reps)
    out["matmuls_s"] = mm
    out["elementwise_rest_s"] = out["forward_backward_s"] - attn - mm
    return {**out, **machine()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    print(json.dumps(step_parts(a.config, a.overrides, a.reps), indent=1))


if __name__ == "__main__":
    main()
