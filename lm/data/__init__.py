"""Data layer: tokenizers, corpora, the prepared token store, and the batches cut from it.

    prepare(source, tokenizer, out)  -> Path        tokenize a corpus into a token store (idempotent)
    open_store(path)                 -> TokenStore  verified, memory-mapped view of a store
    train_iterator(store, ...)       -> iterator    endless, seeded, resumable, process-sharded batches
    eval_batches(store, ...)         -> list        fixed non-overlapping val batches
    check_vocab(store, model_vocab_size)            DataError if the model cannot embed every token
    open_dataset(source, ...)        -> Dataset     what training reads: a store, or a synthetic task

Every user-fixable problem raises DataError with a one-line message saying what to change.
"""

from lm.data.dataset import SYNTHETIC, Dataset, StoreDataset, check_dataset_vocab, open_dataset, register_synthetic
from lm.data.errors import DataError
from lm.data.pipeline import WINDOWS, Rows, TrainIterator, eval_batches, loss_mask, train_iterator
from lm.data.store import TokenStore, check_vocab, default_store_path, open_store
from lm.data.tokenizers import Tokenizer
from lm.data.writer import prepare

__all__ = [
    "SYNTHETIC",
    "Dataset",
    "StoreDataset",
    "check_dataset_vocab",
    "open_dataset",
    "register_synthetic",
    "DataError",
    "TokenStore",
    "Tokenizer",
    "Rows",
    "TrainIterator",
    "WINDOWS",
    "check_vocab",
    "default_store_path",
    "eval_batches",
    "loss_mask",
    "open_store",
    "prepare",
    "train_iterator",
]
