"""Benchmarks behind `attnlab bench`: train-step tokens/s and MFU (step.py), op forward+backward timings (ops.py),
decode-step time and bandwidth (decode.py); and the structure of the Pallas kernels behind `attnlab kernels lower
--report` (kernels.py: grids, dots, loops, TPU VMEM, GPU registers; no timing).

This module stays light (no jax import): the CLI builds its parser from it on every command."""
from __future__ import annotations

import argparse


def add_ops_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options, shared by `python -m lm.bench.ops` and `attnlab bench ops`."""
    p.add_argument("--T", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192], help="sequence lengths")
    p.add_argument("--B", type=int, default=1, help="batch size")
    p.add_argument("--H", type=int, default=8, help="query heads")
    p.add_argument("--Hkv", type=int, default=None, help="kv heads of softmax attention (GQA; default: --H)")
    p.add_argument("--ops", nargs="+", default=["softmax", "linear"], choices=("softmax", "linear"),
                   help="op families to time (default both)")
    p.add_argument("--D", type=int, default=64, help="head dim")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    p.add_argument("--impl", nargs="+", default=["xla"], help="implementations to time: reference xla pallas")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (the median is reported)")
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE.json", help="write the rows here")
    p.add_argument("--write", default=None, metavar="FILE.md",
                   help="write a markdown table (with machine and versions) here")


def add_decode_arguments(p: argparse.ArgumentParser) -> None:
    """The decode benchmark's options, shared by `python -m lm.bench.decode` and `attnlab bench decode`."""
    p.add_argument("--S", type=int, nargs="+", default=[4096, 16384, 65536], help="cache lengths")
    p.add_argument("--B", type=int, default=8, help="batch size (sequences decoded together)")
    p.add_argument("--Hq", type=int, default=32, help="query heads")
    p.add_argument("--Hkv", type=int, default=8, help="kv heads")
    p.add_argument("--D", type=int, default=128, help="head dim")
    p.add_argument("--dtype", default="bfloat16", help="cache and query dtype: float32 | bfloat16")
    p.add_argument("--impl", nargs="+", default=["xla", "pallas"], help="implementations to time")
    p.add_argument("--kv", nargs="+", default=["K,V", "K=V", "K=V+rope"], choices=("K,V", "K=V", "K=V+rope"),
                   help="cache kinds: separate K and V, one K=V array, K=V with keys rotated per slot (default all)")
    p.add_argument("--spkv-density", type=float, nargs="+", default=[], metavar="D",
                   help="also time SP-KV's pruned cache with keep bits drawn at each density (kept share of the "
                        "keys older than the window)")
    p.add_argument("--spkv-window", type=int, default=64, metavar="W", help="SP-KV's ring of recent keys (default 64)")
    p.add_argument("--spkv-headroom", type=float, default=0.1, metavar="F",
                   help="SP-KV store capacity = density x (1 + F) of the older keys per (sequence, kv head) on "
                        "average, in one pool of pages (default 0.1)")
    p.add_argument("--spkv-page", type=int, default=64, metavar="N",
                   help="keys per page of the SP-KV store (default 64)")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions (the median is reported)")
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE.json", help="write the rows here")
