"""Synthetic tasks as training datasets: `data.source: synthetic:<task>` with settings in `data.task`.

Batches are a pure function of (seed, batch index), so the iterator state is just the next index and a
resumed run sees exactly the batches it would have seen. Evaluation uses a disjoint seed stream.
"""
from __future__ import annotations

import dataclasses
import inspect

from lm.data.synthetic.tasks import TASKS
from lm.data import DataError, register_synthetic
from lm.data.pipeline import WINDOWS

_EVAL_SALT = 1_000_003


@dataclasses.dataclass
class _Iterator:
    make: callable
    seed: int
    index: int = 0
    process_index: int = 0
    process_count: int = 1

    def __next__(self) -> dict:
        batch = self.make(self.seed, self.index)
        self.index += 1
        rows = next(iter(batch.values())).shape[0] // self.process_count
        lo = self.process_index * rows
        return {k: v[lo:lo + rows] for k, v in batch.items()}

    def __iter__(self):
        return self

    def get_state(self) -> dict:
        return {"index": self.index, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise DataError(f"synthetic data state was saved with seed {state.get('seed')}, this run uses {self.seed}")
        self.index = int(state["index"])


class SyntheticDataset:
    def __init__(self, task: str, settings: dict, seed: int):
        fn = TASKS[task]
        params = {p for p in inspect.signature(fn).parameters if p not in ("seed", "index", "batch_size", "seq_len")}
        unknown = set(settings) - params
        if unknown:
            raise DataError(f"data.task: unknown setting(s) {sorted(unknown)} for synthetic:{task}; "
                            f"valid: {sorted(params)}")
        required = {p for p, v in inspect.signature(fn).parameters.items()
                    if v.default is inspect.Parameter.empty and p in params}
        missing = required - set(settings)
        if missing:
            raise DataError(f"data.task: synthetic:{task} needs {sorted(missing)} (e.g. --set data.task.{sorted(missing)[0]}=...)")
        self.task, self.settings, self.seed = task, dict(settings), seed
        self.vocab_size = int(settings["vocab_size"])
        self.description = f"synthetic:{task} {settings}"
        self._fn = fn

    def _maker(self, batch_size: int, seq_len: int):
        def make(seed, index):
            try:
                return self._fn(seed, index, batch_size=batch_size, seq_len=seq_len, **self.settings)
            except ValueError as e:
                raise DataError(f"synthetic:{self.task}: {e}") from None

        make(self.seed, 0)  # fail at start, not mid-run, on impossible settings
        return make

    def _windows_only(self, rows) -> None:
        if rows.kind != "windows":
            raise DataError(f"synthetic:{self.task} makes its own rows; data.rows=documents applies to token stores")

    def train_iterator(self, *, seq_len, batch_size, seed, packed=False, process_index=0, process_count=1,
                       rows=WINDOWS):
        self._windows_only(rows)
        if packed:
            raise DataError(f"synthetic:{self.task} has no documents to pack; set data.packed=false")
        if batch_size % process_count:
            raise DataError(f"data.batch_size {batch_size} is not divisible by {process_count} processes")
        return _Iterator(self._maker(batch_size, seq_len), seed, 0, process_index, process_count)

    def eval_batches(self, *, seq_len, batch_size, max_batches, process_index=0, process_count=1, rows=WINDOWS):
        self._windows_only(rows)
        it = _Iterator(self._maker(batch_size, seq_len), self.seed + _EVAL_SALT, 0, process_index, process_count)
        return [next(it) for _ in range(max_batches or 8)]

    def bits_per_byte_factor(self):
        return None

    def tokenizer(self):
        return None

    def identity(self) -> dict:
        return {"kind": "synthetic", "task": self.task, "settings": self.settings, "vocab_size": self.vocab_size}

    def resolved_source(self) -> tuple[str, str]:
        return f"synthetic:{self.task}", "none"


for _name in TASKS:
    register_synthetic(_name)(lambda settings, seed, _name=_name: SyntheticDataset(_name, settings, seed))
