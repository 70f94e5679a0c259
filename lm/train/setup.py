"""What a run is made of before any array exists: its dataset, mesh, model definition, optimizer and the
shardings of its state, all derived from the config."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from lm import data as lmdata
from lm import sharding as shd
from lm.config import Config, ConfigError
from lm.model import ModelDef, abstract_model, init_model
from lm.optim import make_optimizer


def open_data(cfg: Config, log: Callable[[str], None] = print,
              check: Callable[[lmdata.Dataset], None] | None = None) -> lmdata.Dataset:
    """The dataset `data.source` names (the default corpus is prepared on first use), checked against the model;
    `check` runs first (a run's record of its data gives a clearer message than a vocab mismatch)."""
    ds = lmdata.open_dataset(cfg.data.source, tokenizer=cfg.data.tokenizer, data_dir=cfg.data.dir,
                             task=cfg.data.task, seed=cfg.run.seed, val_fraction=cfg.data.val_fraction, log=log)
    if check is not None:
        check(ds)
    lmdata.check_dataset_vocab(ds, cfg.model.vocab_size)
    return ds


def resolved_config(cfg: Config, ds: lmdata.Dataset) -> Config:
    """`cfg` with the data it actually uses: a token store's absolute path (so the run's config.yaml finds it
    from any directory) and its real tokenizer (`data.tokenizer` is ignored when the source is a store)."""
    source, tokenizer = ds.resolved_source()
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": source, "tokenizer": tokenizer})})


def data_rows(cfg: Config) -> lmdata.Rows:
    """How batch rows are cut (data.rows, data.pad_id, data.score_padding, data.score_last)."""
    return lmdata.Rows(cfg.data.rows, cfg.data.pad_id, cfg.data.score_padding, cfg.data.score_last)


def eval_batch_size(cfg: Config) -> int:
    """Eval runs one micro-batch at a time: a step's full batch may only fit as grad_accum micro-batches."""
    return cfg.data.batch_size // cfg.train.grad_accum


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
    check_process_rows(setup.batch_sh, cfg.data.batch_size)
    return setup


def check_process_rows(batch_sh, batch_size: int) -> None:
    """The data pipeline gives process p of P the rows [p*B/P, (p+1)*B/P) of each global batch; the batch
    sharding must ask exactly those of it. It does when the data and fsdp axes (the batch axes) are laid out
    process by process, which they are unless the tensor axis spans processes."""
    n, p = jax.process_count(), jax.process_index()
    if n == 1:
        return
    if batch_size % n:
        raise ConfigError(f"data.batch_size {batch_size} is not divisible by the {n} processes; make it a multiple")
    wanted = set(range(p * batch_size // n, (p + 1) * batch_size // n))
    held = set()
    for index in batch_sh.addressable_devices_indices_map((batch_size,)).values():
        held.update(range(*index[0].indices(batch_size)))
    if held != wanted:
        mesh = dict(batch_sh.mesh.shape)
        raise ConfigError(f"mesh {mesh} puts batch rows on this process's devices that are not its share of the "
                          f"data (process {p} of {n} reads rows {min(wanted)}..{max(wanted)}); make data*fsdp a "
                          f"multiple of the {n} processes and keep mesh.tensor within one process's devices")


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
