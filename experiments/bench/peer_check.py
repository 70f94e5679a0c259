"""Plumbing shared by the peer checks against flash-linear-attention's naive PyTorch recurrences.

The two sides run in separate interpreters (ours needs no torch, theirs no JAX) and exchange .npz
files; this module imports neither framework so both sides can load it.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import tempfile

import numpy as np


def run_torch_side(torch_python: str, script: str, script_args: list[str], arrays: dict) -> dict:
    """Run `script ... --torch-side IN OUT` under `torch_python` on `arrays`; return what it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        in_path, out_path = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        np.savez(in_path, **arrays)
        subprocess.run([torch_python, os.path.abspath(script), *script_args, "--torch-side", in_path, out_path],
                       check=True)
        return dict(np.load(out_path))


def print_comparison(ours: dict, fla: dict, quantities: tuple[str, ...]) -> None:
    """One row per (case, impl): max |diff| and relative RMSE of every quantity against fla's."""
    width = max(len(name) for name, _ in ours) + 1
    print(f"{'case':{width}s} {'impl':9s} " + " ".join(f"{q:>19s}" for q in quantities))
    print(f"{'':{width + 10}s} " + " ".join(f"{'max|diff|  rel':>19s}" for _ in quantities))
    for (name, impl), res in ours.items():
        cells = []
        for key in quantities:
            if key not in res:
                cells.append(f"{'-':>19s}")
                continue
            ref = fla[f"{name}/{key}"].astype(np.float64)
            diff = res[key].astype(np.float64) - ref
            rel = np.sqrt(np.mean(diff ** 2) / np.mean(ref ** 2))
            cells.append(f"{np.abs(diff).max():9.2e} {rel:9.2e}")
        print(f"{name:{width}s} {impl:9s} " + " ".join(cells))


def pack(name: str, x: dict, *, B: int, H: int, K: int, V: int, T: int, starts, scale, with_h0: bool, rng) -> dict:
    """One case's arrays, plus document starts, the scale (NaN: the default) and an initial state when asked,
    under `name/` keys in float32 (integer arrays keep their type), ready for one .npz with every case."""
    x = dict(x, starts=np.asarray((0,) + tuple(starts) + (T,), np.int64),
             scale=np.asarray(np.nan if scale is None else scale))
    if with_h0:
        x["h0"] = rng.standard_normal((B, H, K, V))
    return {f"{name}/{key}": np.asarray(val, np.float32 if val.dtype.kind == "f" else val.dtype)
            for key, val in x.items()}


def unpack(arrays: dict, name: str) -> dict:
    """The arrays of case `name`, without the prefix."""
    prefix = f"{name}/"
    return {key[len(prefix):]: val for key, val in arrays.items() if key.startswith(prefix)}


def load_module(path: str, name: str):
    """A Python file (a peer's reference implementation) as a module, without installing its package."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call_options(c: dict, B: int, T: int) -> tuple[np.ndarray | None, float | None, np.ndarray | None]:
    """An unpacked case's initial state (or None), scale (None: the op's default) and segment ids [B,T]
    (None for one document), as numpy arrays."""
    h0 = c.get("h0")
    scale = None if np.isnan(c["scale"]) else float(c["scale"])
    seg = None
    if len(c["starts"]) > 2:
        seg = np.broadcast_to(np.searchsorted(c["starts"][1:-1], np.arange(T), side="right"), (B, T))
    return h0, scale, seg
