"""Training: one jitted step over pure state on a device mesh, checkpoints that resume exactly, logging.

The step is AOT-compiled before the loop. State = params, optimizer state and step counters; the data
iterator state, RNG seed and W&B id travel with each checkpoint. A step whose loss or gradient norm is
not finite (or above `train.skip_grad_norm`) is rejected: parameters and optimizer state stay as they
were; after `train.max_rejected` rejections in a row the run saves and stops. SIGTERM/SIGINT finish the
current step, save and exit cleanly.
"""
from __future__ import annotations

import dataclasses
import math
import re
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pydantic
from rich.console import Console

from attention import ops
from attention.base import in_train_step
from lm import data as lmdata
from lm import flops as lmflops
from lm import sharding as shd
from lm.checkpoint import Checkpointer
from lm.config import Config, ConfigError, dump_config, load_config
from lm.logging import MetricsFile, WandbRun, make_progress, new_run_id, save_heatmap
from attention.base import StatsByLayer, StatsReport
from lm.model import LM, ModelDef, Params, ParamMeta, abstract_model, count_params, init_model, pop_sown, token_losses
from lm.optim import clip_by_norm, global_norm, keep_accepted, make_optimizer


class RunError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    status: str  # "finished" | "interrupted" | "diverged" | "already_finished"
    step: int
    last_eval: dict | None
    message: str = ""


# ---------------------------------------------------------------------------------------------
# Data


def open_data(cfg: Config, log: Callable[[str], None] = print) -> lmdata.Dataset:
    """The dataset `data.source` names (the default corpus is prepared on first use), checked against the model."""
    ds = lmdata.open_dataset(cfg.data.source, tokenizer=cfg.data.tokenizer, data_dir=cfg.data.dir,
                             task=cfg.data.task, seed=cfg.run.seed, log=log)
    lmdata.check_dataset_vocab(ds, cfg.model.vocab_size)
    return ds


# ---------------------------------------------------------------------------------------------
# The step


def make_loss_fn(mdef: ModelDef):
    def loss_sums(params, batch, rng):
        """(sum of token losses, (number of scored tokens, logits, the mixers' auxiliary loss or None, their
        statistics)) for one batch."""
        model: LM = mdef.merge(params)
        tokens = batch["tokens"]
        inp, tgt = tokens[:, :-1], tokens[:, 1:]
        seg = batch.get("segment_ids")
        seg_in = None if seg is None else seg[:, :-1]
        logits = model(inp, segment_ids=seg_in, rng=rng)
        losses = token_losses(logits, tgt)
        mask = target_mask(batch, losses.shape).astype(losses.dtype)
        aux, stats = pop_sown(model)
        return jnp.sum(losses * mask), (jnp.sum(mask), logits, aux, stats)

    return loss_sums


def target_mask(batch: dict, shape) -> jax.Array:
    """Which targets tokens[:, 1:] are scored: all, minus cross-document ones (packed), times loss_mask."""
    mask = jnp.ones(shape, bool)
    seg = batch.get("segment_ids")
    if seg is not None:  # the last token of a document does not predict the next document
        mask &= seg[:, 1:] == seg[:, :-1]
    if "loss_mask" in batch:
        mask &= batch["loss_mask"].astype(bool)
    return mask


def make_train_step(cfg: Config, mdef: ModelDef, tx: optax.GradientTransformation, schedule) -> Callable:
    loss_sums = make_loss_fn(mdef)
    accum = cfg.train.grad_accum
    base_key = jax.random.PRNGKey(cfg.run.seed)
    skip_norm = cfg.train.skip_grad_norm
    use_rng = cfg.model.dropout > 0
    meta = mdef.meta()
    is_meta = lambda x: isinstance(x, ParamMeta)
    # A parameter is frozen in step s >= freeze_from (0-based): never when frozen_last_steps is 0.
    freeze_from = jax.tree.map(lambda m: cfg.train.steps - m.frozen_last_steps, meta, is_leaf=is_meta)
    any_frozen = any(m.frozen_last_steps for m in jax.tree.leaves(meta, is_leaf=is_meta))

    def objective(p, b, r, step):
        with in_train_step(step, cfg.train.steps):
            total, (count, _, aux, _) = loss_sums(p, b, r)
        # The auxiliary loss joins the mean token loss, so it enters this sum weighted by the token count.
        aux_sum = None if aux is None else aux * count
        return total if aux is None else total + aux_sum, (total, count, aux_sum)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def step_fn(state, batch):
        params = state["params"]
        rng = jax.random.fold_in(base_key, state["step"]) if use_rng else None
        if accum == 1:
            (_, (loss_sum, count, aux_sum)), grads = grad_fn(params, batch, rng, state["step"])
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

            def body(carry, xs):
                i, mb = xs
                r = None if rng is None else jax.random.fold_in(rng, i)
                (_, (ls, c, aux_part)), g = grad_fn(params, mb, r, state["step"])
                acc_g, acc_l, acc_c = carry
                return (jax.tree.map(jnp.add, acc_g, g), acc_l + ls, acc_c + c), aux_part

            zero = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), jnp.float32(0))
            (grads, loss_sum, count), aux_parts = jax.lax.scan(body, zero, (jnp.arange(accum), micro))
            aux_sum = None if aux_parts is None else jnp.sum(aux_parts)
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
        lr = schedule(state["step"] - state["rejected"])  # optax's count: rejected steps do not advance it
        new_state = {
            "params": keep_accepted(new_params, params, ok, accept),
            "opt": keep_accepted(new_opt, state["opt"], ok, accept),
            "step": state["step"] + 1,
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
        correct = jnp.sum((jnp.argmax(logits, -1) == batch["tokens"][:, 1:]) & mask)
        return total, count, correct, stats

    return eval_step


def eval_batch_size(cfg: Config) -> int:
    """Eval runs one micro-batch at a time: a step's full batch may only fit as grad_accum micro-batches."""
    return cfg.data.batch_size // cfg.train.grad_accum


def run_eval_batches(eval_step, params, batches, batch_sh, bpb_factor: float | None,
                     report_stats: Callable[[StatsByLayer], StatsReport]) -> tuple[dict, StatsReport]:
    """The eval record (loss, perplexity, accuracy, tokens, bits per byte, the mixers' metrics) and the
    mixers' full report (heatmaps and summary clauses too)."""
    tot = cnt = cor = 0.0
    stats = None
    for b in batches:
        s, c, k, st = eval_step(params, _to_device_batch(b, batch_sh))
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


# ---------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Setup:
    """Everything about a run that follows from its config alone (no data, no arrays)."""

    cfg: Config
    mesh: Any
    mdef: ModelDef
    tx: optax.GradientTransformation
    schedule: Any
    state_shapes: dict
    state_sh: dict
    param_sh: Any
    batch_sh: Any

    def fresh_state(self) -> dict:
        params = init_model(self.cfg)[1]
        return {"params": params, "opt": self.tx.init(params), "step": jnp.int32(0), "rejected": jnp.int32(0),
                "rejected_run": jnp.int32(0)}

    def abstract_state(self) -> dict:
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            self.state_shapes, self.state_sh)


def build(cfg: Config, devices: list | None = None) -> Setup:
    mesh = shd.make_mesh(cfg, devices)
    mdef, shapes = abstract_model(cfg)
    meta_tree = mdef.meta()
    param_sh = shd.named(shd.param_specs(shapes, meta_tree, mesh), mesh)
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps, meta_tree)
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    setup = Setup(cfg, mesh, mdef, tx, schedule, {}, {}, param_sh,
                  jax.sharding.NamedSharding(mesh, shd.batch_spec()))
    setup.state_shapes = jax.eval_shape(setup.fresh_state)
    state_sh = jax.tree.map(lambda _: repl, setup.state_shapes)
    state_sh["params"] = param_sh
    state_sh["opt"] = _opt_shardings(setup.state_shapes["opt"], setup.state_shapes["params"], param_sh, repl)
    setup.state_sh = state_sh
    return setup


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits."""

    def __init__(self):
        self.signum: int | None = None
        self.prev = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self.prev[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread): no handlers
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self.prev.items():
            signal.signal(s, h)
        return False


_RESUME_KEYS = ("model", "data.seq_len", "data.tokenizer", "data.source", "data.packed")


def _config_mismatch(saved: dict, cfg: Config) -> str | None:
    """The first setting that makes a checkpoint's run differ from `cfg`, or None.

    The saved config is re-validated first, so keys added to attnlab since (with their defaults) do not
    count as differences.
    """
    try:
        saved = Config.model_validate(saved).to_dict()
    except pydantic.ValidationError as e:
        return f"its saved config is not valid for this version: {str(e).splitlines()[1:3]}"
    now = cfg.to_dict()
    for key in _RESUME_KEYS:
        a, b = saved, now
        for part in key.split("."):
            a, b = (a or {}).get(part), (b or {}).get(part)
        diff = _first_difference(a, b, key)
        if diff:
            return diff
    return None


def _first_difference(a: Any, b: Any, where: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(k), b.get(k), f"{where}.{k}")
            if diff:
                return diff
        return None
    return None if a == b else f"{where}: checkpoint has {a!r}, config has {b!r}"


def _to_device_batch(batch: dict, sharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def train(cfg: Config, *, console: Console | None = None, max_steps_this_run: int | None = None,
          init_from: str | Path | None = None) -> RunResult:
    """Train (or resume) the run `run.out_dir/run.name`. `max_steps_this_run` stops early (tests).
    `init_from` (a run directory) starts a fresh run from the parameters of its newest checkpoint that
    match this model by path and shape; a resumed run ignores it."""
    console = console or Console()
    say = lambda msg: console.print(msg, highlight=False, markup=False)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)

    ds = open_data(cfg, log=say)
    setup = build(cfg)
    mesh, mdef, tx, schedule = setup.mesh, setup.mdef, setup.tx, setup.schedule
    state_sh, param_sh, batch_sh, state_shapes = setup.state_sh, setup.param_sh, setup.batch_sh, setup.state_shapes
    n_dev = mesh.devices.size
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.train.ckpt_keep, warn=lambda m: say(f"warning: {m}"))

    def same_run(meta: dict) -> None:
        problem = _config_mismatch(meta.get("config", {}), cfg)
        if problem:
            raise RunError(f"{run_dir} holds checkpoints of a different run ({problem}); "
                           f"use a new run.name or remove {run_dir}")

    try:
        restored = ckpt.restore_latest(setup.abstract_state(), check_meta=same_run)
    except RunError:
        ckpt.close()
        raise
    it = ds.train_iterator(seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, seed=cfg.run.seed,
                              packed=cfg.data.packed, process_index=jax.process_index(),
                              process_count=jax.process_count())
    if restored is not None:
        start_step, state, meta, data_state = restored
        it.set_state(data_state)
        run_id = meta.get("wandb_id") or new_run_id()
        say(f"resuming {run_dir} from step {start_step}"
            + (f"; --init-from {init_from} applies only to a fresh run and is ignored" if init_from else ""))
    else:
        start_step, run_id = 0, new_run_id()
        state = jax.jit(setup.fresh_state, out_shardings=state_sh)()
        if init_from is not None:
            try:
                state["params"] = params_from_run(state["params"], init_from, say)
            except RunError:
                ckpt.close()
                raise

    (run_dir / "config.yaml").write_text(dump_config(cfg))
    n_params = count_params(state_shapes["params"])
    model_for_costs = mdef.merge(state_shapes["params"])
    fwd_flops = model_for_costs.flops_per_token(cfg.data.seq_len)
    train_flops_tok = lmflops.train_flops_per_token(fwd_flops)

    if start_step >= cfg.train.steps:
        ckpt.close()
        msg = f"run {run_dir} already finished at step {start_step} (train.steps={cfg.train.steps})"
        say(msg)
        return RunResult(run_dir, "already_finished", start_step, None, msg)

    step_fn = make_train_step(cfg, mdef, tx, schedule)
    eval_fn = make_eval_step(mdef)
    ops.clear_choices()
    t0 = time.perf_counter()
    first = _to_device_batch(next(it), batch_sh)
    train_step = jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                         donate_argnums=(0,)).lower(state, first).compile()
    compile_s = time.perf_counter() - t0
    eval_step = jax.jit(eval_fn, in_shardings=(param_sh, batch_sh))
    impls = [(label, c.op, c.chosen, c.reason) for label, c in ops.choices()]

    peak, peak_src = lmflops.peak_flops(cfg.hardware.peak_tflops,
                                        jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32)
    say(f"model: {n_params / 1e6:.2f}M params, {fwd_flops / 1e6:.2f} MFLOP/token forward, "
        f"{n_dev} device(s) mesh={dict(mesh.shape)}; step compiled in {compile_s:.1f}s")
    say(f"peak: {peak / 1e9:.1f} GFLOP/s per device ({peak_src})")
    for label, op, chosen, reason in impls:
        say(f"  {label}: {op} -> {chosen} ({reason})")

    wb_config = {**cfg.to_dict(), "n_params": n_params, "flops_per_token": fwd_flops, "kernel_impls": impls}
    if init_from is not None and restored is None:
        wb_config["init_from"] = str(init_from)
    wandb = WandbRun(cfg.wandb, run_dir, run_id, wb_config)
    metrics_file = MetricsFile(run_dir / "metrics.jsonl", start_step if restored else None)
    eval_set = ds.eval_batches(seq_len=cfg.data.seq_len, batch_size=eval_batch_size(cfg),
                               max_batches=cfg.train.eval_steps, process_index=jax.process_index(),
                               process_count=jax.process_count())
    bpb = ds.bits_per_byte_factor()
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len

    def meta_dict(step):
        return {"step": step, "seed": cfg.run.seed, "rng_key": [int(x) for x in np.asarray(
            jax.random.key_data(jax.random.PRNGKey(cfg.run.seed)))], "wandb_id": run_id, "config": cfg.to_dict()}

    def run_eval(step):
        res, report = run_eval_batches(eval_step, state["params"], eval_set, batch_sh, bpb,
                                       model_for_costs.report_stats)
        rec = {"step": step, **res}
        metrics_file.write(rec)
        wandb.log(rec, step)
        for name, hm in report.heatmaps.items():
            png = save_heatmap(hm.rows, run_dir / f"{name}_step{step}.png", title=f"{hm.title}, step {step}",
                               xlabel=hm.xlabel)
            wandb.log_image(name, png, step)
        return rec, report

    status, message, last_eval = "finished", "", None
    stop_at = cfg.train.steps if max_steps_this_run is None else min(cfg.train.steps, start_step + max_steps_this_run)
    step = start_step
    batch = first
    data_state = it.get_state()
    pending: list[tuple[int, dict]] = []
    t_log, step_log = time.perf_counter(), step
    progress = make_progress(console)
    try:
        with _StopFlag() as stop, progress:
            task = progress.add_task(cfg.run.name, total=cfg.train.steps, completed=step, info="")
            while step < stop_at:
                state, m = train_step(state, batch)
                step += 1
                pending.append((step, m))
                data_state = it.get_state()  # after the batches consumed so far, before the prefetch below
                if step < stop_at:
                    batch = _to_device_batch(next(it), batch_sh)
                # One step behind: the device already runs this step while we read the previous one's counter.
                if len(pending) >= 2 and int(pending[-2][1]["rejected_run"]) >= cfg.train.max_rejected:
                    status = "diverged"
                if step % cfg.train.log_every == 0 or step == stop_at or status != "finished" or stop.signum:
                    vals = jax.device_get([mm for _, mm in pending])
                    now = time.perf_counter()
                    tps = tokens_per_step * (step - step_log) / max(now - t_log, 1e-9)
                    t_log, step_log = now, step
                    last = vals[-1]
                    rec = {"step": step, "loss": float(last["loss"]),
                           "loss_avg": float(np.mean([float(v["loss"]) for v in vals])),
                           "lr": float(last["lr"]), "grad_norm": float(last["grad_norm"]), "tokens_per_s": tps,
                           "mfu": tps * train_flops_tok / (peak * n_dev), "rejected_steps": int(last["rejected"])}
                    if "aux_loss" in last:
                        rec["aux_loss"] = float(last["aux_loss"])
                    if int(last["rejected_run"]) >= cfg.train.max_rejected:
                        status = "diverged"
                    metrics_file.write(rec)
                    wandb.log(rec, step)
                    progress.update(task, completed=step, info=f"loss {rec['loss']:.4f}  {tps:,.0f} tok/s  "
                                                                f"mfu {rec['mfu'] * 100:.1f}%")
                    if not console.is_terminal:
                        say(f"step {step}: loss {rec['loss']:.4f} lr {rec['lr']:.2e} gnorm {rec['grad_norm']:.3f} "
                            f"{tps:,.0f} tok/s mfu {rec['mfu'] * 100:.1f}%")
                    pending = []
                if status == "diverged":
                    message = (f"stopped at step {step}: {cfg.train.max_rejected} steps in a row had a non-finite "
                               f"loss or gradient (or grad norm above train.skip_grad_norm); parameters are from the "
                               f"last good step. Lower optim.lr or raise optim.warmup_steps, then resume.")
                    break
                if stop.signum:
                    status = "interrupted"
                    message = f"received {signal.Signals(stop.signum).name}: saved at step {step}, exiting"
                    break
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != stop_at:
                    last_eval, _ = run_eval(step)
                if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0:
                    ckpt.save(step, state, meta_dict(step), data_state)
        if status == "finished":
            last_eval, report = run_eval(step)
            bits = f", {last_eval['eval_bpb']:.4f} bits/byte" if "eval_bpb" in last_eval else ""
            say(f"eval at step {step}: loss {last_eval['eval_loss']:.4f} nats/token{bits}, "
                f"ppl {last_eval['eval_ppl']:.2f}, accuracy {last_eval['eval_acc']:.4f}"
                + "".join(f", {clause}" for clause in report.summary))
        ckpt.save(step, state, meta_dict(step), data_state)
        wandb.summary({"final_step": step, **(last_eval or {})})
    finally:
        metrics_file.close()
        wandb.finish()
        ckpt.close()
    if message:
        say(message)
    return RunResult(run_dir, status, step, last_eval, message)


def params_from_run(params: Params, run_dir: str | Path, say: Callable[[str], None]) -> Params:
    """`params` with every array whose path and shape match one in `run_dir`'s newest checkpoint loaded
    from it; the rest keep their initial values. Says which were loaded and which not."""
    from lm.eval import load_run  # lm.eval builds on this module

    _, _, source, source_step = load_run(run_dir)
    source_by_path = {jax.tree_util.keystr(p, simple=True, separator="."): x
                      for p, x in jax.tree_util.tree_flatten_with_path(source)[0]}
    loaded, kept_init = [], []

    def pick(path, x):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        y = source_by_path.get(name)
        if y is not None and y.shape == x.shape and y.dtype == x.dtype:
            loaded.append(name)
            return jax.device_put(y, x.sharding)
        kept_init.append(name if y is None else f"{name} (checkpoint shape {tuple(y.shape)})")
        return x

    out = jax.tree_util.tree_map_with_path(pick, params)
    if not loaded:
        raise RunError(f"--init-from {run_dir}: no parameter of this model matches its checkpoint (step "
                       f"{source_step}) by path and shape; give a run of the same architecture")
    unused = sorted(set(source_by_path) - set(loaded))
    n_loaded = sum(int(np.prod(source_by_path[n].shape)) for n in loaded)
    say(f"init from {run_dir} step {source_step}: loaded {len(loaded)} of {len(loaded) + len(kept_init)} "
        f"parameter arrays ({n_loaded:,} values); initialised fresh: {_layer_groups(kept_init) or 'none'}; "
        f"in the checkpoint but unused: {_layer_groups(unused) or 'none'}")
    return out


def _layer_groups(names: list[str]) -> str:
    """Parameter names with the layer index folded: blocks.*.mixer.spkv.w1 (x4)."""
    counts: dict[str, int] = {}
    for n in names:
        key = re.sub(r"^blocks\.\d+\.", "blocks.*.", n)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(k if c == 1 else f"{k} (x{c})" for k, c in counts.items())


def _opt_shardings(opt_shapes, param_shapes, param_sh, repl):
    """Optimizer-state leaves shaped like a parameter take its sharding (matched by tree path suffix)."""
    by_path = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes)[0]:
        by_path[tuple(str(p) for p in path)] = leaf
    sh_by_path = {tuple(str(p) for p in path): s
                  for path, s in jax.tree_util.tree_flatten_with_path(param_sh)[0]}

    def pick(path, leaf):
        keys = tuple(str(p) for p in path)
        for n in range(len(keys)):
            suffix = keys[n:]
            if suffix in by_path and by_path[suffix].shape == leaf.shape:
                return sh_by_path[suffix]
        return repl

    return jax.tree_util.tree_map_with_path(pick, opt_shapes)


def train_from_file(path: str, overrides: list[str], **kw) -> RunResult:
    return train(load_config(path, overrides), **kw)


__all__ = ["train", "train_from_file", "RunResult", "RunError", "open_data", "ConfigError"]
