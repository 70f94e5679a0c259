"""Sweeps: one spec file says "these configs x these overrides x these seeds" (experiments/sweeps/*.yaml).

- `spec`: load, validate and expand a spec into runs (`load_sweep`);
- `local`: train the runs here one after another, and the sweep's manifest `<out_dir>/<name>/sweep.json`;
- `emit`: SLURM / TPU-VM / shell launch scripts for the runs;
- `cli`: the `attnlab sweep` subcommand.
"""
from lm.sweep.spec import Run, Sweep, Variant, load_sweep

__all__ = ["Run", "Sweep", "Variant", "load_sweep"]
