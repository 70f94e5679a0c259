"""The decoder: embed -> N x [norm -> mixer -> norm -> mlp] -> norm -> head.

`LM(cfg, rngs=...)` maps tokens [B,T] to fp32 logits [B,T,V]. Each block's mixer comes from
`model.pattern` (cycled over the layers) and `attention.MIXERS`. The residual stream (embeddings, block sums,
norm outputs) is in model.dtype, or in fp32 with `model.residual_dtype: float32` while every projection still
casts its input to model.dtype: what torch's bf16 autocast does to a GPT-2 block. Two recipes are covered by the
config: modern (RMSNorm, RoPE, SwiGLU, no biases) and GPT-2 (LayerNorm with bias, learned positions,
GELU, biases, tied embeddings).

The training loop works on a pure nested dict of parameter arrays (`Params`); `ModelDef` keeps the
NNX graph and rebuilds a module from such a dict inside jit.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from attention import MIXERS, ops
from attention.base import AuxLoss, Stat, StatsByLayer, StatsReport
from lm.config import Config
from attention.layers import MLP, Embed, Linear, dense, make_norm, positions_from_segments

Params = dict[str, Any]


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


MIXER_OUT = "mixer_out"  # the name a block gives its mixer's output, for the `mixer_out` remat policy

# model.remat_policy -> what a jax.checkpoint region saves for the backward pass (None: nothing, recompute all).
REMAT_POLICIES = {
    "nothing": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "mixer_out": jax.checkpoint_policies.save_only_these_names(MIXER_OUT),
}


def remat_policy(name: str):
    return REMAT_POLICIES[name]


class Block(nnx.Module):
    def __init__(self, cfg: Config, layer_idx: int, *, rngs: nnx.Rngs):
        m = cfg.model
        ctx = cfg.mixer_context(layer_idx)
        self.name, mcfg = m.mixer_for_layer(layer_idx)
        self.label = f"layer{layer_idx}.{self.name}"
        self.norm1 = make_norm(m.norm, m.d_model, eps=m.norm_eps, bias=m.bias)
        self.mixer = MIXERS[mcfg.kind].module(mcfg, ctx, rngs=rngs)
        self.norm2 = make_norm(m.norm, m.d_model, eps=m.norm_eps, bias=m.bias)
        # identity: the branch adds norm2(x) itself, as Zoology's blocks with an Identity state mixer do
        self.mlp = None if m.mlp.kind == "identity" else MLP(
            m.d_model, m.mlp.hidden, kind=m.mlp.kind, bias=m.bias, std=m.init_std, out_std=ctx.out_std, dtype=ctx.dtype,
            rngs=rngs)
        self.dropout = m.dropout
        self.remat_mixer = m.remat == "mixer"
        self.remat_policy = remat_policy(m.remat_policy)

    def __call__(self, x, positions, segment_ids, rng):
        r1, r2 = jax.random.split(rng) if rng is not None else (None, None)
        with ops.label_calls(self.label):
            if self.remat_mixer:
                h = nnx.remat(lambda mixer, x_: mixer(x_, positions=positions, segment_ids=segment_ids),
                              policy=self.remat_policy)(self.mixer, self.norm1(x))
            else:
                h = self.mixer(self.norm1(x), positions=positions, segment_ids=segment_ids)
        h = checkpoint_name(h, MIXER_OUT)
        x = x + _dropout(h, self.dropout, r1)
        return x + _dropout(self._mlp(self.norm2(x)), self.dropout, r2)

    def _mlp(self, h):
        return h if self.mlp is None else self.mlp(h)

    def decode(self, x, cache, position):
        with ops.label_calls(self.label):
            h, cache = self.mixer.decode(self.norm1(x), cache, position)
        x = x + h
        return x + self._mlp(self.norm2(x)), cache


class LM(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        m = cfg.model
        self.cfg = cfg
        self.dtype = jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32
        residual = jnp.float32 if m.residual_dtype == "float32" else self.dtype  # the lookups set the stream's dtype
        self.embed = Embed(m.vocab_size, m.d_model, axes=("vocab", "embed"), std=m.init_std, dtype=residual, rngs=rngs)
        self.pos_embed = Embed(m.max_seq_len, m.d_model, axes=(None, "embed"), std=m.init_std, dtype=residual,
                               rngs=rngs) if m.pos == "learned" else None
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(m.n_layers)])
        self.final_norm = make_norm(m.norm, m.d_model, eps=m.norm_eps, bias=m.bias)
        self.head = None if m.tie_embeddings else Linear(m.d_model, m.vocab_size, axes=("embed", "vocab"),
                                                         std=m.init_std, dtype=self.dtype, rngs=rngs)
        self.remat = m.remat
        self.dropout = m.dropout
        self.embed_dropout = m.embed_dropout

    def _embed(self, tokens_BT, positions_BT):
        x = self.embed(tokens_BT)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions_BT)
        return x

    def _logits(self, x_BTD):
        x = self.final_norm(x_BTD)
        w = self.embed.embedding[...].T if self.head is None else self.head.kernel[...]
        return dense(x.astype(self.dtype), w.astype(self.dtype), preferred_element_type=jnp.float32)

    def __call__(self, tokens_BT: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, rng: jax.Array | None = None) -> jax.Array:
        """Logits [B,T,V] in fp32. `rng` enables dropout (training); positions default to the index
        within each segment."""
        B, T = tokens_BT.shape
        if positions is None:
            positions = positions_from_segments(segment_ids) if segment_ids is not None else \
                jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        use_rng = rng is not None and (self.dropout > 0 or self.embed_dropout > 0)
        rngs = jax.random.split(rng, len(self.blocks) + 1) if use_rng else None
        x = _dropout(self._embed(tokens_BT, positions), self.embed_dropout, None if rngs is None else rngs[-1])
        for i, block in enumerate(self.blocks):
            r = None if rngs is None else rngs[i]
            if self.remat == "block":
                x = nnx.remat(lambda blk, x_, r_: blk(x_, positions, segment_ids, r_),
                              policy=block.remat_policy)(block, x, r)
            else:
                x = block(x, positions, segment_ids, r)
        return self._logits(x)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> list:
        dtype = dtype or self.dtype
        return [b.mixer.init_cache(batch, max_len, dtype) for b in self.blocks]

    def decode(self, tokens_B1: jax.Array, cache: list, position: jax.Array) -> tuple[jax.Array, list]:
        """One token per sequence at `position` (a scalar shared by the batch): logits [B,1,V], new cache."""
        B = tokens_B1.shape[0]
        x = self._embed(tokens_B1, jnp.full((B, 1), position, jnp.int32))
        new_cache = []
        for block, c in zip(self.blocks, cache):
            x, c = block.decode(x, c, position)
            new_cache.append(c)
        return self._logits(x), new_cache

    # Analytic costs -------------------------------------------------------------------------
    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: mixers + MLPs + the output head (embedding lookups are free)."""
        m = self.cfg.model
        total = 2.0 * m.d_model * m.vocab_size
        for b in self.blocks:
            total += b.mixer.flops_per_token(seq_len) + (b.mlp.flops_per_token() if b.mlp is not None else 0)
        return total

    def cache_bytes_per_token(self, dtype_bytes: int | None = None) -> int:
        """KV-cache bytes per token summed over the layers (constant-state layers add 0)."""
        return sum(b.mixer.cache_bytes_per_token(dtype_bytes) for b in self.blocks)

    def state_bytes(self) -> int:
        """Fixed-size decode state per sequence (recurrent states, conv windows) summed over the layers."""
        return sum(b.mixer.state_bytes() for b in self.blocks)

    def schedule_values(self, step: int, total: int) -> dict[str, float]:
        """The mixers' schedule values at 0-based step `step` (a value shared by layers is logged once)."""
        out: dict[str, float] = {}
        for b in self.blocks:
            out.update(b.mixer.schedule_values(step, total))
        return out

    def report_stats(self, stats: StatsByLayer) -> StatsReport:
        """What the mixers' eval statistics (summed over batches, by block label) amount to: each distinct
        reporter of the model's mixer classes runs once over all of them."""
        reporters = dict.fromkeys(r for b in self.blocks for r in type(b.mixer).stat_reporters)
        report = StatsReport()
        for r in reporters:
            report = report.merge(r(stats))
        return report


def pop_sown(model: LM) -> tuple[jax.Array | None, dict[str, dict[str, jax.Array]]]:
    """What the mixers sowed during the last call, removed from the model: the sum of their AuxLoss values
    (None when none was sown) and their Stat values by block label and name, each summed over its sow calls."""
    aux = [v for _, var in nnx.to_flat_state(nnx.pop(model, AuxLoss)) for v in var.value]
    stats: dict[str, dict[str, jax.Array]] = {}
    for block in model.blocks:
        for path, var in nnx.to_flat_state(nnx.pop(block, Stat)):
            stats.setdefault(block.label, {})[str(path[-1])] = sum(var.value)
    return (sum(aux) if aux else None), stats


def token_losses(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Per-token cross-entropy in fp32 (nats)."""
    logz = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return logz - picked


# ---------------------------------------------------------------------------------------------
# Pure-parameter view of a model, for jit, optax and orbax.


@dataclasses.dataclass(frozen=True)
class ParamMeta:
    axes: tuple[str | None, ...]
    decay: bool  # conventional: matrices decay; norms, biases, embeddings don't
    never_decay: bool  # the method forbids it (e.g. KDA's A_log and dt_bias), whatever optim.wd_mask says
    lr_mult: float
    frozen_last_steps: int = 0  # no gradient and no update in the run's last N steps


def _stringify(tree):
    if isinstance(tree, dict):
        return {str(k): _stringify(v) for k, v in tree.items()}
    return tree


class ModelDef:
    """The NNX graph of a model plus an abstract state; turns a Params dict back into a module."""

    def __init__(self, model: LM):
        self.graphdef, state = nnx.split(model)
        self.template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
        self.cfg = model.cfg

    def merge(self, params: Params) -> LM:
        state = jax.tree.map(lambda a: a, self.template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def meta(self) -> dict:
        """Params-shaped tree of ParamMeta (logical axes, weight decay on/off, learning-rate multiplier, freezing)."""
        flat = nnx.to_flat_state(self.template)
        out: dict = {}
        for path, var in flat:
            md = var.get_metadata()
            node = out
            for p in path[:-1]:
                node = node.setdefault(str(p), {})
            ndim = len(var.value.shape) if hasattr(var, "value") else len(var.shape)
            axes = tuple(md.get("axes", (None,) * ndim))
            node[str(path[-1])] = ParamMeta(axes, bool(md.get("decay", ndim >= 2)), bool(md.get("never_decay", False)),
                                             float(md.get("lr_mult", 1.0)), int(md.get("frozen_last_steps", 0)))
        return out


def init_model(cfg: Config, seed: int | None = None) -> tuple[ModelDef, Params]:
    """Build the model on the host and return its definition and fp32 parameters."""
    model = LM(cfg, rngs=nnx.Rngs(params=cfg.run.seed if seed is None else seed))
    mdef = ModelDef(model)
    params = _stringify(nnx.to_pure_dict(nnx.state(model)))
    return mdef, params


def abstract_model(cfg: Config) -> tuple[ModelDef, Params]:
    """Model definition and ShapeDtypeStruct params without allocating or initialising anything."""
    holder = {}

    def build():
        mdef, params = init_model(cfg)
        holder["mdef"] = mdef
        return params

    shapes = jax.eval_shape(build)
    return holder["mdef"], shapes


def count_params(params: Params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
