"""The training loop: restore or start a run, compile its step, step with logging, evaluation and checkpoints
at their intervals, and save at the end.

The step is AOT-compiled before the loop, and the loop reads from the device only at log intervals. After
`train.max_rejected` rejected steps in a row the run saves and stops. SIGTERM/SIGINT finish the current step
(in a multi-process run: the steps to the next log or checkpoint step), save and exit cleanly.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console

from attention import ops
from attention.base import StatsByLayer, StatsReport
from lm import data as lmdata
from lm import devices, distributed, stop
from lm import flops as lmflops
from lm.checkpoint import Checkpointer
from lm.config import Config, dump_config, load_config
from lm.model import LM, count_params
from lm.tracking import MetricsFile, WandbRun, make_progress, new_run_id, read_metrics, save_heatmap
from lm.storage import RunStorage
from lm.train.rundir import (RunError, RunResult, check_same_run, checkpoint_dir, checkpoint_meta, config_changes,
                             history, library_logs, open_run_data, params_from_run, record_data, run_dir_of, run_lock,
                             run_storage, run_url, schedule_change, set_aside_history)
from lm.train.setup import Setup, build, data_rows, eval_batch_size, resolved_config
from lm.train.step import make_eval_step, make_train_step, run_eval_batches, to_device_batch


def train_from_file(path: str, overrides: list[str], **kw) -> RunResult:
    return train(load_config(path, overrides), **kw)


def train(cfg: Config, *, console: Console | None = None, max_steps_this_run: int | None = None,
          init_from: str | Path | None = None, restart: bool = False) -> RunResult:
    """Train (or resume) the run `run.out_dir/run.name`. `max_steps_this_run` stops early (tests).
    `init_from` (a run directory) starts a fresh run from the parameters of its newest checkpoint that
    match this model by path and shape; a resumed run ignores it. A run directory with history but no usable
    checkpoint starts again from step 0 only with `restart` (its old metrics are kept beside).
    In a multi-process run (lm/distributed.py) every process calls this; only process 0 writes and prints."""
    console = console or Console()
    if not distributed.is_primary():
        console = Console(quiet=True)
    say = _printer(console)
    devices.check_platform(cfg.run.platform)
    say(devices.describe())
    run_dir, remote = run_dir_of(cfg), run_storage(cfg)
    with run_lock(run_dir, shared=remote is None), library_logs(run_dir):
        if remote is not None:  # the run directory is a URL: its files come to the local mirror first
            remote.pull()
        ds = open_run_data(run_dir, cfg, say)
        cfg = resolved_config(cfg, ds)
        # The eval split is cut before anything compiles or is written: a corpus too small for it fails at once.
        eval_set = ds.eval_batches(seq_len=cfg.data.seq_len, batch_size=eval_batch_size(cfg),
                                   max_batches=cfg.train.eval_steps, process_index=jax.process_index(),
                                   process_count=jax.process_count(), rows=data_rows(cfg))
        setup = build(cfg)
        ckpt = Checkpointer(checkpoint_dir(cfg), keep=cfg.train.ckpt_keep, warn=lambda m: say(f"warning: {m}"),
                            async_save=cfg.train.async_checkpoint)
        try:
            result = _train_locked(setup, ds, eval_set, ckpt, init_from, restart, max_steps_this_run, console,
                                   remote)
        finally:
            ckpt.close()
            if remote is not None and distributed.is_primary():
                remote.push()
    if result.message:
        say(result.message)
    return result


def _train_locked(setup: Setup, ds: lmdata.Dataset, eval_set: list, ckpt: Checkpointer,
                  init_from: str | Path | None, restart: bool, max_steps_this_run: int | None,
                  console: Console, remote: RunStorage | None) -> RunResult:
    cfg, run_dir, say = setup.cfg, run_dir_of(setup.cfg), _printer(console)
    start = _restore_or_init(setup, ds, ckpt, init_from, restart, say)
    if distributed.is_primary():
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        record_data(run_dir, ds.identity())
        if remote is not None:
            remote.push()
    if start.step >= cfg.train.steps:
        return RunResult(run_dir, "already_finished", start.step, None, f"run {run_url(cfg)} already finished at "
                         f"step {start.step} (train.steps={cfg.train.steps})")
    stop_at = cfg.train.steps if max_steps_this_run is None else min(cfg.train.steps, start.step + max_steps_this_run)
    return _run(setup, ds, eval_set, ckpt, start, stop_at, init_from, console, remote)


def _printer(console: Console) -> Callable[[str], None]:
    """Plain lines: paths and numbers are not read as rich markup nor highlighted, and long lines are not cut
    at the console width (a log file or a pipe has none)."""
    return lambda msg: console.print(msg, highlight=False, markup=False, soft_wrap=True)


def impl_summary(impls: list[tuple[str, str, str, str]]) -> list[str]:
    """One line per (op, implementation, reason) with the layers that got it, from (layer, op, chosen, reason)."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for label, op, chosen, reason in impls:
        groups.setdefault((op, chosen, reason), []).append(label)
    return [f"  {op} -> {chosen} in {len(labels)} layer(s) [{', '.join(labels)}]: {reason}"
            for (op, chosen, reason), labels in groups.items()]


@dataclasses.dataclass
class _Start:
    """Where a run (re)starts: the step, the state, the train data positioned there, the W&B run id."""

    step: int
    state: dict
    batches: Any
    run_id: str
    resumed: bool


def _restore_or_init(setup: Setup, ds: lmdata.Dataset, ckpt: Checkpointer, init_from: str | Path | None,
                     restart: bool, say: Callable[[str], None]) -> _Start:
    """The newest checkpoint of the run if it has one (refused if it is of a different run), else a fresh
    state, with the parameters of `init_from` where they match. A fresh state over a directory with history
    needs `restart`."""
    cfg, run_dir, where = setup.cfg, run_dir_of(setup.cfg), run_url(setup.cfg)
    restored = ckpt.restore_latest(setup.abstract_state(), check_meta=lambda meta: check_same_run(run_dir, meta, cfg))
    batches = ds.train_iterator(seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, seed=cfg.run.seed,
                                packed=cfg.data.packed, process_index=jax.process_index(),
                                process_count=jax.process_count(), rows=data_rows(cfg))
    if restored is not None:
        step, state, meta, data_state = restored
        batches.set_state(data_state)
        distributed.note_progress(checkpoint=step)
        say(f"resuming {where} from step {step}"
            + (f"; --init-from {init_from} applies only to a fresh run and is ignored" if init_from else ""))
        changes = config_changes(meta.get("config", {}), cfg)
        if changes:
            say(f"resuming with changed settings, which apply from step {step} on: {'; '.join(changes)}")
        lr_note = schedule_change(meta.get("config", {}), cfg, step)
        if lr_note:
            say(lr_note)
        return _Start(step, state, batches, meta.get("wandb_id") or new_run_id(), resumed=True)
    found, lost_progress = history(run_dir, run_storage(cfg))
    if lost_progress and not restart:
        raise RunError(f"{where} has history ({'; '.join(found)}) but no usable checkpoint to resume from; "
                       f"to train it again from step 0 pass --restart (the old metrics are kept as "
                       f"metrics.<time>.jsonl), or use another run.name")
    if found:
        say(f"starting {where} from step 0 (no checkpoint was saved yet); its earlier metrics are kept in "
            f"{set_aside_history(run_dir)}" if not lost_progress else
            f"restarting {where} from step 0; earlier metrics kept in {set_aside_history(run_dir)}")
    state = jax.jit(setup.fresh_state, out_shardings=setup.state_sh)()
    if init_from is not None:
        state["params"] = params_from_run(state["params"], init_from, say)
    return _Start(0, state, batches, new_run_id(), resumed=False)


@dataclasses.dataclass
class _Costs:
    n_params: int
    fwd_flops: float  # per token
    train_flops: float  # per token
    peak: float  # FLOP/s of all devices together
    peak_note: str  # FLOP/s per device and where that number came from


def _costs(setup: Setup, model: LM) -> _Costs:
    cfg = setup.cfg
    fwd = model.flops_per_token(cfg.data.seq_len)
    peak, peak_src = lmflops.peak_flops(cfg.hardware.peak_tflops,
                                        jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32)
    return _Costs(count_params(setup.state_shapes["params"]), fwd, lmflops.train_flops_per_token(fwd),
                  peak * setup.mesh.devices.size, f"{peak / 1e9:.1f} GFLOP/s per device ({peak_src})")


def _compile(setup: Setup, state: dict, batches) -> tuple[Callable, Callable, dict, list, float]:
    """(train step compiled for `state`, jitted eval step, the first batch on device, which implementation
    each attention op got as (layer, op, chosen, reason), seconds it took)."""
    step_fn = make_train_step(setup.cfg, setup.mdef, setup.tx, setup.schedule)
    eval_fn = make_eval_step(setup.mdef)
    ops.clear_choices()
    t0 = time.perf_counter()
    first = to_device_batch(next(batches), setup.batch_sh)
    train_step = jax.jit(step_fn, in_shardings=(setup.state_sh, setup.batch_sh), out_shardings=(setup.state_sh, None),
                         donate_argnums=(0,)).lower(state, first).compile()
    compile_s = time.perf_counter() - t0
    eval_step = jax.jit(eval_fn, in_shardings=(setup.param_sh, setup.batch_sh))
    impls = [(label, c.op, c.chosen, c.reason) for label, c in ops.choices()]
    return train_step, eval_step, first, impls, compile_s


@dataclasses.dataclass
class _Run:
    """What the loop works with once the step is compiled: the run's config, functions and outputs."""

    setup: Setup
    console: Console
    run_id: str
    ckpt: Checkpointer
    train_step: Callable
    eval_step: Callable
    report_stats: Callable[[StatsByLayer], StatsReport]
    schedule_values: Callable[[int, int], dict[str, float]]
    eval_set: list
    bpb_factor: float | None
    costs: _Costs
    metrics: MetricsFile
    wandb: WandbRun
    remote: RunStorage | None = None  # the run directory is a URL: the mirror's files are copied up (process 0)
    ckpt_stall: float = 0.0  # seconds checkpoint saves held the loop since the last log record

    @property
    def cfg(self) -> Config:
        return self.setup.cfg

    def say(self, msg: str) -> None:
        _printer(self.console)(msg)

    def sync(self, force: bool = True) -> None:
        """Copy the mirror's new files (metrics, W&B, logs) to a URL run directory; without `force` only when the
        last copy is a while old."""
        if self.remote is not None and distributed.is_primary():
            self.remote.push(force=force)

    def save(self, pos: _Position) -> None:
        """Checkpoint `pos`; the seconds the loop was held go into the next log record (ckpt_stall_s). The metrics
        of the steps it holds are stored before it."""
        self.sync()
        self.ckpt_stall += self.ckpt.save(pos.step, pos.state, checkpoint_meta(self.cfg, pos.step, self.run_id),
                                          pos.data_state)
        distributed.note_progress(checkpoint=pos.step)

    def evaluate(self, step: int, params) -> tuple[dict, StatsReport]:
        """Eval on the held-out batches, recorded in metrics.jsonl and W&B, heatmaps saved as PNGs."""
        res, report = run_eval_batches(self.eval_step, params, self.eval_set, self.setup.batch_sh, self.bpb_factor,
                                       self.report_stats)
        rec = {"step": step, **res}
        self.metrics.write(rec)
        self.wandb.log(rec, step)
        run_dir = run_dir_of(self.cfg)
        for name, hm in (report.heatmaps.items() if distributed.is_primary() else ()):
            png = save_heatmap(hm.rows, run_dir / f"{name}_step{step}.png", title=f"{hm.title}, step {step}",
                               xlabel=hm.xlabel)
            self.wandb.log_image(name, png, step)
        return rec, report


@dataclasses.dataclass
class _Position:
    """Where the loop is: the last step done, the state after it, the data iterator's state that goes with
    it, and how the run stands."""

    step: int
    state: dict
    data_state: dict
    status: str = "finished"
    message: str = ""
    last_eval: dict | None = None
    save: bool = True  # False once the state is known to be ruined: the last checkpoint must stay the newest


def _run(setup: Setup, ds: lmdata.Dataset, eval_set: list, ckpt: Checkpointer, start: _Start, stop_at: int,
         init_from: str | Path | None, console: Console, remote: RunStorage | None = None) -> RunResult:
    """Compile, open the run's outputs, step to `stop_at`, evaluate and save."""
    cfg, run_dir = setup.cfg, run_dir_of(setup.cfg)
    early = distributed.agree(stop.pending() or 0)  # every process stops here, or none
    if early:
        return RunResult(run_dir, "interrupted", start.step, None, f"received {signal.Signals(early).name} before "
                         f"the first step: nothing new to save (resumes from step {start.step}), exiting")
    train_step, eval_step, first, impls, compile_s = _compile(setup, start.state, start.batches)
    model = setup.mdef.merge(setup.state_shapes["params"])  # abstract: for its costs and its stats report
    costs = _costs(setup, model)
    _announce(_printer(console), setup, costs, impls, compile_s)
    wb_config = {**cfg.to_dict(), "n_params": costs.n_params, "flops_per_token": costs.fwd_flops,
                 "kernel_impls": impls}
    if init_from is not None and not start.resumed:
        wb_config["init_from"] = str(init_from)
    primary = distributed.is_primary()
    wandb = WandbRun(cfg.wandb if primary else cfg.wandb.model_copy(update={"mode": "disabled"}), run_dir,
                     start.run_id, wb_config)
    if start.resumed and (run_dir / "metrics.jsonl").is_file():
        replayed = wandb.replay(read_metrics(run_dir / "metrics.jsonl"), start.step)
        if replayed:
            _printer(console)(f"W&B: replayed {replayed} metrics records a killed segment may have lost")
    metrics = MetricsFile(run_dir / "metrics.jsonl" if primary else None, start.step if start.resumed else None)
    run = _Run(setup, console, start.run_id, ckpt, train_step, eval_step, model.report_stats, model.schedule_values,
               eval_set, ds.bits_per_byte_factor(), costs, metrics, wandb, remote)
    pos = _Position(start.step, start.state, start.batches.get_state())
    try:
        _train_steps(run, pos, start.batches, first, stop_at)
        _finish(run, pos)
    finally:
        metrics.close()
        wandb.finish()
    return RunResult(run_dir, pos.status, pos.step, pos.last_eval, pos.message)


def _announce(say: Callable[[str], None], setup: Setup, costs: _Costs, impls: list, compile_s: float) -> None:
    say(f"model: {costs.n_params / 1e6:.2f}M params, {costs.fwd_flops / 1e6:.2f} MFLOP/token forward, "
        f"{setup.mesh.devices.size} device(s) mesh={dict(setup.mesh.shape)}; step compiled in {compile_s:.1f}s")
    say(f"peak: {costs.peak_note}")
    for line in impl_summary(impls):
        say(line)


def _train_steps(run: _Run, pos: _Position, batches, batch: dict, stop_at: int) -> None:
    """Steps from `pos` to `stop_at`, or until the run diverges or a signal arrives, logging, evaluating and
    saving at their intervals; `pos` follows."""
    cfg = run.cfg
    pending: list[dict] = []
    throughput = _Throughput(cfg.data.batch_size * cfg.data.seq_len, pos.step)
    progress = make_progress(run.console)
    watch = _DivergenceWatch(cfg.train.diverge_ratio, cfg.train.diverge_margin)
    with _StopFlag() as stop, progress:
        task = progress.add_task(cfg.run.name, total=cfg.train.steps, completed=pos.step, info="")
        while pos.step < stop_at:
            pos.state, metrics = run.train_step(pos.state, batch)
            # With retry_rejected a rejected step is tried again on the next batch: reading its verdict waits for
            # the step, which a run that retries pays once per step.
            advanced = bool(metrics["ok"]) if cfg.train.retry_rejected else True
            pos.step += advanced
            pending.append(metrics)
            pos.data_state = batches.get_state()  # after the batches consumed so far, before the prefetch below
            if pos.step < stop_at:
                batch = to_device_batch(next(batches), run.setup.batch_sh)
            # One step behind: the device already runs this step while we read the previous one's counter.
            if len(pending) >= 2 and int(pending[-2]["rejected_run"]) >= cfg.train.max_rejected:
                pos.status = "diverged"
            if not advanced and int(metrics["rejected_run"]) < cfg.train.max_rejected:
                continue  # the same step again: nothing is due that was not due before it
            ckpt_due = bool(cfg.train.ckpt_every) and pos.step % cfg.train.ckpt_every == 0
            signum = stop.poll(pos.step % cfg.train.log_every == 0 or pos.step == stop_at or ckpt_due)
            log_due = pos.step % cfg.train.log_every == 0 or pos.step == stop_at or pos.status != "finished" \
                or signum
            # Before any save, and at every log: is the loss still in its range? Ruined weights stay finite.
            if pending and (log_due or ckpt_due) and watch.check(pos.step - len(pending) + 1, pending):
                pos.status, pos.save = "diverged", False
                pos.message = (f"stopped at step {pos.step}: {watch.why}; the run diverged. Its state was not saved: "
                               f"the newest checkpoint ({_newest(run.ckpt)}) is from before. Resume from it with a "
                               f"lower optim.lr or more optim.warmup_steps (train.diverge_ratio=0 turns this check off)")
                _log_interval(run, pos.step, pending, throughput)
                return
            if log_due:
                distributed.note_progress(step=pos.step)
                rec, last = _log_interval(run, pos.step, pending, throughput)
                progress.update(task, completed=pos.step, info=f"loss {rec['loss']:.4f}  {rec['tokens_per_s']:,.0f}"
                                                               f" tok/s  mfu {rec['mfu'] * 100:.1f}%")
                if int(last["rejected_run"]) >= cfg.train.max_rejected:
                    pos.status = "diverged"
                pending = []
            if pos.status == "diverged":
                pos.message = (f"stopped at step {pos.step}: {cfg.train.max_rejected} steps in a row had a non-finite "
                               f"loss or gradient (or grad norm above train.skip_grad_norm); parameters are from the "
                               f"last good step. Lower optim.lr or raise optim.warmup_steps, then resume.")
                return
            if signum:
                pos.status = "interrupted"
                pos.message = f"received {signal.Signals(signum).name}: saved at step {pos.step}, exiting"
                return
            if cfg.train.eval_every and pos.step % cfg.train.eval_every == 0 and pos.step != stop_at:
                pos.last_eval, _ = run.evaluate(pos.step, pos.state["params"])
            if ckpt_due:
                run.save(pos)


def _log_interval(run: _Run, step: int, pending: list[dict], throughput: _Throughput) -> tuple[dict, dict]:
    """Write the record of the steps since the last log (the latest step's values, the mean loss, throughput)
    to metrics.jsonl and W&B, and to the console when it is not a terminal. Returns (the record, the latest
    step's metrics on the host)."""
    vals = jax.device_get(pending)
    tps = throughput.tokens_per_s(step)
    last = vals[-1]
    rec = {"step": step, "loss": float(last["loss"]), "loss_avg": float(np.mean([float(v["loss"]) for v in vals])),
           "lr": float(last["lr"]), "grad_norm": float(last["grad_norm"]), "tokens_per_s": tps,
           "mfu": tps * run.costs.train_flops / run.costs.peak, "rejected_steps": int(last["rejected"])}
    if "aux_loss" in last:
        rec["aux_loss"] = float(last["aux_loss"])
    if run.ckpt_stall:
        rec["ckpt_stall_s"], run.ckpt_stall = run.ckpt_stall, 0.0
    rec.update(run.schedule_values(step - 1, run.cfg.train.steps))  # the mixers' schedules at the last step
    run.metrics.write(rec)
    run.wandb.log(rec, step)
    run.sync(force=False)
    if not run.console.is_terminal:
        run.say(f"step {step}: loss {rec['loss']:.4f} lr {rec['lr']:.2e} gnorm {rec['grad_norm']:.3f} "
                f"{tps:,.0f} tok/s mfu {rec['mfu'] * 100:.1f}%")
    return rec, last


def _finish(run: _Run, pos: _Position) -> None:
    """The final eval (only when the run reached its last step) and checkpoint, and the W&B summary."""
    if pos.status == "finished":
        pos.last_eval, report = run.evaluate(pos.step, pos.state["params"])
        ev = pos.last_eval
        bits = f", {ev['eval_bpb']:.4f} bits/byte" if "eval_bpb" in ev else ""
        run.say(f"eval at step {pos.step}: loss {ev['eval_loss']:.4f} nats/token{bits}, ppl {ev['eval_ppl']:.2f}, "
                f"accuracy {ev['eval_acc']:.4f}" + "".join(f", {clause}" for clause in report.summary))
    if pos.save:
        run.save(pos)
    run.wandb.summary({"final_step": pos.step, **(pos.last_eval or {})})


def _newest(ckpt: Checkpointer) -> str:
    steps = ckpt.steps()
    return f"step {steps[-1]}" if steps else "none yet"


class _DivergenceWatch:
    """Catches a run whose loss leaves its range before anything turns non-finite: a loss above `ratio` times
    the mean of the last WINDOW finite losses (after MIN_SEEN of them) and at least `margin` nats above it.
    The margin keeps a run whose loss is near zero (a solved synthetic task: 0.06 after a mean of 0.016) from
    being called diverged by a blip. Non-finite losses are the rejected-step guard's; they do not enter the mean."""

    WINDOW, MIN_SEEN = 50, 2

    def __init__(self, ratio: float, margin: float = 1.0):
        self.ratio, self.margin = ratio, margin
        self.recent: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self.checked = 0  # the last step looked at
        self.why = ""

    def check(self, first_step: int, metrics: list[dict]) -> bool:
        """Look at the losses of steps first_step, first_step + 1, ... (device metrics, fetched here); True
        when one of them is out of range, with the reason in `why`."""
        if not self.ratio:
            return False
        losses = [float(m["loss"]) for m in jax.device_get(metrics)]
        for step, loss in enumerate(losses, start=first_step):
            if step <= self.checked or not math.isfinite(loss):
                continue
            self.checked = step
            if len(self.recent) >= self.MIN_SEEN:
                mean = sum(self.recent) / len(self.recent)
                if loss > self.ratio * mean and loss - mean >= self.margin:
                    self.why = (f"the loss at step {step}, {loss:.4g}, is {loss / mean:.1f}x the mean of the last "
                                f"{len(self.recent)} finite losses ({mean:.4g})")
                    return True
            self.recent.append(loss)
        return False


class _Throughput:
    """Tokens per second since the previous reading."""

    def __init__(self, tokens_per_step: int, step: int):
        self.tokens_per_step = tokens_per_step
        self.t, self.step = time.perf_counter(), step

    def tokens_per_s(self, step: int) -> float:
        now = time.perf_counter()
        tps = self.tokens_per_step * (step - self.step) / max(now - self.t, 1e-9)
        self.t, self.step = now, step
        return tps


class _StopFlag:
    """SIGTERM/SIGINT/SIGHUP set a flag; the loop finishes its step, saves and exits. A signal that arrived while
    the run was starting (lm.stop) is taken over. In a multi-process run the processes agree on the flag at log
    and checkpoint steps (`poll`)."""

    def __init__(self):
        self.signum: int | None = stop.take()
        self.prev = {}

    def __enter__(self):
        for s in stop.handled((signal.SIGTERM, signal.SIGINT, signal.SIGHUP)):
            try:
                self.prev[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread): no handlers
                pass
        return self

    def poll(self, boundary: bool) -> int | None:
        """The signal that arrived. A multi-process run must stop all its processes at the same step, so they
        agree on it (a small all-gather that waits for the step) only at `boundary` steps (logs, checkpoints),
        where the loop waits for the device anyway; a signal stops them at the next one."""
        if jax.process_count() == 1:
            return self.signum
        return (distributed.agree(self.signum or 0) or None) if boundary else None

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self.prev.items():
            signal.signal(s, h)
        return False
