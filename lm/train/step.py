"""The jitted functions of a run: the loss, the train step and the eval step, and eval over a set of batches.

State = params, optimizer state and step counters. A step whose loss or gradient norm is not finite (or above
`train.skip_grad_norm`) is rejected: parameters and optimizer state stay as they were, and the `rejected_run`
counter tells the loop how many steps in a row were. A rejected step counts towards train.steps, or with
`train.retry_rejected` it does not: `step` then counts accepted steps only, the next batch tries the same step
again, and every schedule (learning rate, frozen parameters, SP-KV anneal) follows the accepted steps.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attention.base import StatsByLayer, StatsReport, in_train_step
from lm.config import Config
from lm.model import LM, ModelDef, ParamMeta, pop_sown, token_losses
from lm.optim import clip_by_norm, global_norm, keep_accepted


def to_device_batch(batch: dict, sharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def make_loss_fn(mdef: ModelDef):
    def loss_sums(params, batch, rng):
        """(sum of token losses, (number of scored tokens, logits, the mixers' auxiliary loss or None, their
        statistics)) for one batch."""
        model: LM = mdef.merge(params)
        tokens = batch["tokens"]
        inp, tgt = tokens[:, :-1], batch_targets(batch)
        seg = batch.get("segment_ids")
        seg_in = None if seg is None else seg[:, :-1]
        logits = model(inp, segment_ids=seg_in, rng=rng)
        losses = token_losses(logits, tgt)
        mask = target_mask(batch, losses.shape).astype(losses.dtype)
        aux, stats = pop_sown(model)
        return jnp.sum(losses * mask), (jnp.sum(mask), logits, aux, stats)

    return loss_sums


def batch_targets(batch: dict):
    """What position t predicts: tokens[:, t + 1], or `targets` [B, T] where a task's answer is not the next
    input (MQAR's queried values)."""
    return batch["targets"] if "targets" in batch else batch["tokens"][:, 1:]


def target_mask(batch: dict, shape) -> jax.Array:
    """Which targets tokens[:, 1:] are scored: all, minus cross-document ones (packed), times loss_mask."""
    mask = jnp.ones(shape, bool)
    seg = batch.get("segment_ids")
    if seg is not None:  # the last token of a document does not predict the next document
        mask &= seg[:, 1:] == seg[:, :-1]
    if "loss_mask" in batch:
        mask &= batch["loss_mask"].astype(bool)
    return mask


def _make_summed_grads(cfg: Config, mdef: ModelDef) -> Callable:
    """(params, batch, rng, step) -> (loss sum, scored tokens, auxiliary loss sum or None, gradient sums) of one
    batch, taken as `train.grad_accum` micro-batches."""
    loss_sums = make_loss_fn(mdef)
    accum = cfg.train.grad_accum

    def objective(p, b, r, step):
        with in_train_step(step, cfg.train.steps):
            total, (count, _, aux, _) = loss_sums(p, b, r)
        # The auxiliary loss joins the mean token loss, so it enters this sum weighted by the token count.
        aux_sum = None if aux is None else aux * count
        return total if aux is None else total + aux_sum, (total, count, aux_sum)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def summed_grads(params, batch, rng, step):
        if accum == 1:
            (_, (loss_sum, count, aux_sum)), grads = grad_fn(params, batch, rng, step)
            return loss_sum, count, aux_sum, grads
        micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

        def body(carry, xs):
            i, mb = xs
            r = None if rng is None else jax.random.fold_in(rng, i)
            (_, (ls, c, aux_part)), g = grad_fn(params, mb, r, step)
            acc_g, acc_l, acc_c = carry
            return (jax.tree.map(jnp.add, acc_g, g), acc_l + ls, acc_c + c), aux_part

        zero = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), jnp.float32(0))
        (grads, loss_sum, count), aux_parts = jax.lax.scan(body, zero, (jnp.arange(accum), micro))
        return loss_sum, count, None if aux_parts is None else jnp.sum(aux_parts), grads

    return summed_grads


def make_train_step(cfg: Config, mdef: ModelDef, tx: optax.GradientTransformation, schedule) -> Callable:
    """(state, batch) -> (next state, metrics of the step): one optimizer step, or a rejected one."""
    summed_grads = _make_summed_grads(cfg, mdef)
    base_key = jax.random.PRNGKey(cfg.run.seed)
    skip_norm = cfg.train.skip_grad_norm
    use_rng = cfg.model.dropout > 0
    meta = mdef.meta()
    is_meta = lambda x: isinstance(x, ParamMeta)
    # A parameter is frozen in step s >= freeze_from (0-based): never when frozen_last_steps is 0.
    freeze_from = jax.tree.map(lambda m: cfg.train.steps - m.frozen_last_steps, meta, is_leaf=is_meta)
    any_frozen = any(m.frozen_last_steps for m in jax.tree.leaves(meta, is_leaf=is_meta))
    retry = cfg.train.retry_rejected

    def step_fn(state, batch):
        params = state["params"]
        attempt = state["step"] + state["rejected"] if retry else state["step"]  # a retry draws new dropout
        rng = jax.random.fold_in(base_key, attempt) if use_rng else None
        loss_sum, count, aux_sum, grads = summed_grads(params, batch, rng, state["step"])
        count = jnp.maximum(count, 1.0)
        loss = loss_sum / count
        grads = jax.tree.map(lambda g: g / count, grads)
        frozen = None
        if any_frozen:
            frozen = jax.tree.map(lambda start: state["step"] >= start, freeze_from)
            grads = jax.tree.map(lambda g, z: jnp.where(z, 0.0, g), grads, frozen)
        gnorm = global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        if skip_norm is not None:
            ok &= gnorm <= skip_norm
        grads = clip_by_norm(grads, gnorm, cfg.optim.clip)
        # A rejected step must not poison the optimizer moments: feed zeros and discard the result.
        safe_grads = jax.tree.map(lambda g: jnp.where(ok, g, 0), grads)
        updates, new_opt = tx.update(safe_grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)
        # Frozen parameters keep their values and their optimizer moments: no update, no weight decay.
        accept = None if frozen is None else jax.tree.map(lambda z: ok & ~z, frozen)
        # optax's count: rejected steps do not advance it (with retry, `step` already leaves them out)
        lr = schedule(state["step"] if retry else state["step"] - state["rejected"])
        new_state = {
            "params": keep_accepted(new_params, params, ok, accept),
            "opt": keep_accepted(new_opt, state["opt"], ok, accept),
            "step": state["step"] + (ok.astype(jnp.int32) if retry else 1),
            "rejected": state["rejected"] + (~ok).astype(jnp.int32),
            "rejected_run": jnp.where(ok, 0, state["rejected_run"] + 1).astype(jnp.int32),
        }
        metrics = {"loss": loss, "grad_norm": gnorm, "lr": lr, "ok": ok,
                   "rejected": new_state["rejected"], "rejected_run": new_state["rejected_run"]}
        if aux_sum is not None:
            metrics["aux_loss"] = aux_sum / count
        return new_state, metrics

    return step_fn


def make_eval_step(mdef: ModelDef) -> Callable:
    """(loss sum, scored targets, correct argmax predictions, the mixers' statistics) of one batch."""
    loss_sums = make_loss_fn(mdef)

    def eval_step(params, batch):
        total, (count, logits, _, stats) = loss_sums(params, batch, None)
        mask = target_mask(batch, logits.shape[:2])
        correct = jnp.sum((jnp.argmax(logits, -1) == batch_targets(batch)) & mask)
        return total, count, correct, stats

    return eval_step


def run_eval_batches(eval_step, params, batches, batch_sh, bpb_factor: float | None,
                     report_stats: Callable[[StatsByLayer], StatsReport]) -> tuple[dict, StatsReport]:
    """The eval record (loss, perplexity, accuracy, tokens, bits per byte, the mixers' metrics) and the
    mixers' full report (heatmaps and summary clauses too)."""
    tot = cnt = cor = 0.0
    stats = None
    for b in batches:
        s, c, k, st = eval_step(params, to_device_batch(b, batch_sh))
        tot, cnt, cor = tot + float(s), cnt + float(c), cor + float(k)
        st = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(st))
        stats = st if stats is None else jax.tree.map(np.add, stats, st)
    loss = tot / max(cnt, 1.0)
    out = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_acc": cor / max(cnt, 1.0),
           "eval_tokens": int(cnt)}
    if bpb_factor is not None:
        out["eval_bpb"] = loss * bpb_factor
    report = report_stats(stats or {})
    out.update(report.metrics)
    return out, report
