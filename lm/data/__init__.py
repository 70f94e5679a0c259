"""Data layer: tokenizers, corpora, the prepared token store, and the batches cut from it.

    prepare(source, tokenizer, out)  -> Path        tokenize a corpus into a token store (idempotent, resumable)
    open_store(path)                 -> TokenStore  verified, memory-mapped view of a store
    train_iterator(store, ...)       -> iterator    endless, seeded, resumable, process-sharded batches
    eval_batches(store, ...)         -> list        fixed non-overlapping val batches
    check_vocab(store, model_vocab_size)            DataError if the model cannot embed every token
    open_dataset(source, ...)        -> Dataset     what training reads: a store, or a synthetic task

Every user-fixable problem raises DataError with a one-line message saying what to change.

The names are imported on first use: a tokenizer worker process of `prepare` imports this package and should
not pay for the training pipeline's imports (grain) it never uses.
"""

import importlib
import importlib.util

_EXPORTS = {
    "lm.data.dataset": ["SYNTHETIC", "Dataset", "StoreDataset", "check_dataset_vocab", "open_dataset",
                        "register_synthetic"],
    "lm.data.errors": ["DataError"],
    "lm.data.pipeline": ["WINDOWS", "Rows", "TrainIterator", "eval_batches", "loss_mask", "train_iterator"],
    "lm.data.store": ["TokenStore", "check_vocab", "default_store_path", "open_store"],
    "lm.data.tokenizers": ["Tokenizer"],
    "lm.data.writer": ["prepare"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule, e.g. lm.data.pipeline
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
