"""The flash kernels' tiles on GPU, per chip and head dim: the blocks (block_q, block_k) and each kernel's Triton
warps and stages (forward, dq, dk/dv).

`gpu_tiles.json` beside this file holds the table. `attnlab kernels tune` times every candidate on the chip it
runs on and writes that chip's entry (`tune`, with the timing and spill checks of `lm.bench.flash_tiles`); a chip
without an entry takes "default", which is chosen without timing: blocks whose three kernels compile for sm_90a
without spilling registers (ptxas, see `kernels lower --report --ptxas`).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Callable

TABLE = Path(__file__).with_name("gpu_tiles.json")
DEFAULT = "default"
KERNELS = ("forward", "dq", "dkv")


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_q: int
    block_k: int
    launch: tuple  # (num_warps, num_stages) of the forward, dq and dk/dv kernels

    def as_json(self) -> dict:
        return dict(block_q=self.block_q, block_k=self.block_k,
                    **{k: list(ws) for k, ws in zip(KERNELS, self.launch)})

    @classmethod
    def from_json(cls, entry: dict) -> "Tiles":
        return cls(entry["block_q"], entry["block_k"], tuple(tuple(entry[k]) for k in KERNELS))


def head_dim_key(head_dim: int) -> str:
    """Entries are per padded head dim: Triton pads it to a power of two of at least 16."""
    return f"d{max(16, 1 << max(0, (head_dim - 1).bit_length()))}"


def load(path: Path = TABLE) -> dict:
    return json.loads(Path(path).read_text())


def lookup(device_kind: str, head_dim: int, table: dict | None = None) -> Tiles:
    """The chip's tiles for a head dim, else the default's; the nearest head dim above (or the largest) when
    the table has no entry for this one."""
    table = load() if table is None else table
    entries = table.get(device_kind, table[DEFAULT])
    key = head_dim_key(head_dim)
    if key not in entries:
        dims = sorted(int(k[1:]) for k in entries)
        key = f"d{next((d for d in dims if d >= int(key[1:])), dims[-1])}"
    return Tiles.from_json(entries[key])


def candidates() -> list[Tiles]:
    """What `tune` times: blocks of 64 and 128 rows, square and rectangular; 4 or 8 warps for each kernel; 2 or 3
    stages, shared by the three."""
    blocks = ((64, 64), (128, 64), (64, 128), (128, 128))
    return [Tiles(bq, bk, ((fwd, stages), (dq, stages), (dkv, stages)))
            for (bq, bk), fwd, dq, dkv, stages in itertools.product(blocks, (4, 8), (4, 8), (4, 8), (2, 3))]


def tune(measure: Callable[[Tiles, int], float | None], device_kind: str, head_dims, *,
         path: Path = TABLE, tiles: list[Tiles] | None = None) -> dict:
    """Time `measure(tiles, head_dim)` (seconds; None: the candidate cannot run, e.g. it spills or fails to
    compile) for every candidate and head dim, write the fastest into the table under `device_kind` (other
    chips' entries kept) and return {head dim key: [(seconds or None, tiles), ...]} with every timing."""
    tiles = candidates() if tiles is None else tiles
    table = load(path) if Path(path).exists() else {}
    timings = {}
    for d in head_dims:
        times = [(measure(t, d), t) for t in tiles]
        timings[head_dim_key(d)] = times
        ran = [(s, t) for s, t in times if s is not None]
        if not ran:
            raise RuntimeError(f"no candidate tile ran at head dim {d} on {device_kind}")
        table.setdefault(device_kind, {})[head_dim_key(d)] = min(ran, key=lambda st: st[0])[1].as_json()
    Path(path).write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return timings
