"""Training: one jitted step over pure state on a device mesh, checkpoints that resume exactly, logging.

- `setup`: what follows from the config alone (dataset, mesh, model definition, optimizer, shardings);
- `step`: the loss, the train and eval steps, eval over a set of batches;
- `rundir`: the run directory (resume checks, checkpoint metadata, loading a trained run, init-from);
- `loop`: `train` itself.
"""
from lm.config import ConfigError
from lm.train.loop import train, train_from_file
from lm.train.rundir import RunError, RunResult, load_run, params_from_run
from lm.train.setup import Setup, build, eval_batch_size, open_data
from lm.train.step import make_eval_step, make_loss_fn, make_train_step, run_eval_batches, target_mask

__all__ = ["train", "train_from_file", "RunResult", "RunError", "load_run", "params_from_run", "Setup", "build",
           "eval_batch_size", "open_data", "make_train_step", "make_eval_step", "make_loss_fn", "target_mask",
           "run_eval_batches", "ConfigError"]
