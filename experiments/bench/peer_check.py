"""Plumbing shared by the peer checks against flash-linear-attention's naive PyTorch recurrences.

The two sides run in separate interpreters (ours needs no torch, theirs no JAX) and exchange .npz
files; this module imports neither framework so both sides can load it.
"""
from __future__ import annotations

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
