"""A hybrid layout designed per head from SP-KV densities against every fixed position of the one global layer, at
2048 tokens with a 128-key window (16x the window), at equal decode-cache budget.

    python -m experiments.ablations.design_hybrid_heads

1. trains (or finds finished) the SP-KV runs of experiments/sweeps/text_spkv_2048.yaml (`--only 'spkv-*'`: the lr
   tuned on seed 0, then seeds 1-5; the paper's predictor settings, next-token loss alone, the last quarter frozen
   with a hard-gate ramp);
2. designs the layout from those 5 seeds' per-head densities (`attnlab design-hybrid ... --per-head`, runs that
   keep >= 0.9 of their older keys refused) at the budget of one global layer in four, (1 + 3 * 128/2048) / 4 =
   0.297 of the all-global cache at 2048 tokens, and writes configs/tiny/hybrid2048_heads.yaml; its header also
   names the fixed position a per-layer design from the same densities picks (that variant is in the sweep);
3. runs experiments/sweeps/design_hybrid_heads.yaml (the design and the global layer at positions 0-3, the lr
   tuned per variant, 5 seeds) and writes its report.
Rerunning skips what has finished.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from lm.config import load_config
from lm.design_hybrid import Design, design, layer_costs, render
from lm.report.cli import make_report
from lm.sweep.local import previous_statuses, run_local
from lm.sweep.spec import load_sweep
from lm.sweep.tune import resolved

SOURCE = "experiments/sweeps/text_spkv_2048.yaml"
SPEC = "experiments/sweeps/design_hybrid_heads.yaml"
DESIGNED = Path("configs/tiny/hybrid2048_heads.yaml")
BASE = Path("configs/tiny/softmax.yaml")
COMMAND = "python -m experiments.ablations.design_hybrid_heads"


def source_runs(spec: str = SOURCE, variant: str = "spkv") -> list[Path]:
    """The finished runs of `variant` in the sweep of `spec`, one per seed (a seed that is also the tune seed's is
    its chosen tuning run); SystemExit naming the command when some have not finished."""
    sweep = resolved(load_sweep(spec), previous_statuses(load_sweep(spec)))
    statuses = previous_statuses(sweep)  # the chosen runs' too
    runs = [r for r in sweep.runs if r.variant == variant and r.stage != "tune"]
    done = [Path(sweep.sweep_dir) / (r.reuses or r.name) for r in runs
            if statuses.get(r.reuses or r.name) == "finished"]
    if not runs or len(done) < len(sweep.seeds):
        raise SystemExit(f"{len(done)} of {len(sweep.seeds)} seeds of {variant} have finished in {spec}; run "
                         f"attnlab sweep {spec} --local --only '{variant}-*'")
    return done


def budget_of_one_global_layer(context: int, window: int) -> float:
    """The decode-cache fraction of the 3:1 local:global layout (any position of the global layer) at `context`."""
    fixed = load_config("configs/tiny/hybrid_local3_global1.yaml", [f"model.mixers.local.sliding_window={window}"])
    dense = load_config(str(BASE))
    return sum(layer_costs(fixed, context)) / sum(layer_costs(dense, context))


def write_design(runs: list[Path], out: Path = DESIGNED) -> tuple[Design, Design]:
    """Design the per-head layout from `runs` at one global layer's budget and write it (on
    configs/tiny/softmax.yaml) to `out`, its header naming the sweep variant a per-layer design equals. Returns
    (per head, per layer)."""
    src = load_config(runs[0] / "config.yaml")
    window = src.model.mixers[src.model.pattern[0]].spkv.window
    budget = round(budget_of_one_global_layer(src.data.seq_len, window), 6)
    heads = design(runs, budget, per_head=True, name="tiny-hybrid2048-heads")
    layers = design(runs, budget)
    (position,) = [i for i, kind in enumerate(layers.layout) if kind == "global"]
    note = (f"A per-layer design from the same densities keeps layer {position} global (mean densities "
            f"{', '.join(f'{x:.3f}' for x in layers.densities)}): variant global{position} of the sweep.")
    out.write_text(render(heads, os.path.relpath(BASE.resolve(), out.parent.resolve()), notes=[note]))
    return heads, layers


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    source = load_sweep(SOURCE)
    code = run_local(source, only=["spkv-*"])
    if code != 0:
        return code
    heads, layers = write_design(source_runs())
    print(f"per head: layout {heads.layout}, global heads {heads.global_heads}, cache {heads.cost:.3f} of "
          f"all-global, written to {DESIGNED}; per layer: {layers.layout}")
    sweep = load_sweep(SPEC)
    code = run_local(sweep)
    if code == 0:
        out = make_report([sweep.sweep_dir], command=COMMAND)
        print(f"report: {out['markdown']}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
