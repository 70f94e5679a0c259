"""`attnlab design-hybrid RUN_DIR... --budget F [--per-head]`: a hybrid local/global layout derived from SP-KV
runs' measured gate densities.

An SP-KV run logs, at each eval, the density of every (layer, KV head): the fraction of the keys that have left
the local window which its gate keeps (`spkv_density_heads` in metrics.jsonl). A head whose gate keeps many keys
uses far context; one that keeps few can be local. The design averages the densities of the newest eval of each
run given (seeds of one config: one seed's densities are that seed's noise; at least `--min-runs`, default 3) and
refuses a run whose gates keep nearly everything (mean density >= `--max-density`, default 0.9): such a run has
not learned which keys it needs, so its densities cannot rank heads.

Per layer (the default): the densest layers stay global (full attention, every key cached), the others become
`local` layers (a sliding window of W keys) or `linear` layers (a fixed-size recurrent state), as many global
layers as the KV budget allows (ranked by the mean over a layer's KV heads; ties to the earlier layer).

Per head (`--per-head`, the SP-KV paper's "Strategy D": the densest heads global, the rest local): the unit is a
(layer, KV head); the densest units stay global (ties to the earlier layer, then head) and every other KV head, with
the query heads that read it, attends within the window (`local_heads` of the softmax mixer). A layer is `global`
(no local head), `local` (every head local) or `layer<i>`, its own mixer listing its local heads.

Cost model: the bytes one sequence's decode cache holds at context length T (default: the runs' seq_len), layer
by layer (the mixers' `cache_bytes_per_token * T + state_bytes`): a global head `per_token * T`, a local head
`per_token * W` (its decode cache is a ring of the last W keys), a linear layer its fixed state, plus any fixed
state (short-conv history) of each layer. The budget F is a fraction of the same model with every layer global
and no SP-KV. The number of global layers (heads) is the largest that fits.

The output is a complete config (the runs' resolved config with `model.pattern` spelled out per layer, the
layout's mixers, and a new run.name), with a header saying how it was derived.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Sequence

import yaml

from lm.config import Config, ConfigError, dump_config, load_config
from lm.model import abstract_model
from lm.tracking import read_metrics

GLOBAL, LOCAL, LINEAR = "global", "local", "linear"
MIN_RUNS = 3
MAX_DENSITY = 0.9


class DesignError(ValueError):
    """The runs cannot be designed from (no SP-KV, no densities, too few, not pruning) or the budget cannot be met."""


@dataclasses.dataclass
class Design:
    """The derived layout and the numbers behind it."""

    run_dirs: list[str]
    steps: list[int]  # per run, the eval step whose densities were used
    head_densities: list[list[float]]  # per layer and KV head, mean over the runs
    layout: list[str]  # per layer: the mixer name (global | local | linear | layer<i>)
    global_heads: list[list[int]]  # per layer, the KV heads that read the whole context
    per_head: bool
    budget: float
    cost: float  # the layout's cache bytes per sequence at `context`, as a fraction of all-global
    context: int
    window: int
    rest: str
    config: Config

    @property
    def densities(self) -> list[float]:
        """Per layer, the mean over its KV heads."""
        return [sum(h) / len(h) for h in self.head_densities]

    def summary(self) -> dict:
        return {"run_dirs": self.run_dirs, "steps": self.steps, "densities": self.densities,
                "head_densities": self.head_densities, "layout": self.layout, "per_head": self.per_head,
                "global_heads": self.global_heads, "budget": self.budget, "cost": self.cost, "context": self.context,
                "window": self.window, "rest": self.rest,
                "global_layers": [i for i, heads in enumerate(self.global_heads)
                                  if len(heads) == len(self.head_densities[i])]}


def head_densities(run_dir: Path, labels: list[str], n_kv_heads: int) -> tuple[int, list[list[float]]]:
    """(step, density per layer and KV head) from the newest eval record with per-head densities."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise DesignError(f"{run_dir} has no metrics.jsonl: design-hybrid reads an SP-KV run's logged densities")
    evals = [r for r in read_metrics(metrics) if isinstance(r.get("spkv_density_heads"), dict)]
    if not evals:
        raise DesignError(f"{run_dir}/metrics.jsonl has no eval with spkv_density_heads: train the SP-KV run "
                          f"through at least one eval (train.eval_every, or to its end)")
    last = evals[-1]
    heads = last["spkv_density_heads"]
    missing = [lb for lb in labels if lb not in heads]
    if missing:
        raise DesignError(f"{run_dir}: no densities for layer(s) {', '.join(missing)}; design-hybrid needs SP-KV "
                          f"on every layer (model.pattern naming one softmax or cca mixer with spkv set)")
    wrong = {len(heads[lb]) for lb in labels} - {n_kv_heads}
    if wrong:
        raise DesignError(f"{run_dir}: {min(wrong)} densities per layer, the mixer has {n_kv_heads} KV heads: the "
                          f"metrics are not this config's")
    return int(last["step"]), [[float(x) for x in heads[lb]] for lb in labels]


def _source(run_dirs: Sequence[Path]) -> Config:
    """The runs' config (they must differ only in what a seed changes), checked to be one SP-KV mixer throughout."""
    for d in run_dirs:
        if not (d / "config.yaml").is_file():
            raise DesignError(f"{d} is not a run directory (no config.yaml)")
    cfgs = [load_config(d / "config.yaml") for d in run_dirs]
    for d, c in zip(run_dirs[1:], cfgs[1:]):
        if c.model != cfgs[0].model or c.data.seq_len != cfgs[0].data.seq_len:
            raise DesignError(f"{d} is not the model of {run_dirs[0]} (model or data.seq_len differ): design-hybrid "
                              f"averages seeds of one SP-KV config")
    cfg = cfgs[0]
    m = cfg.model
    names = {m.mixer_for_layer(i)[0] for i in range(m.n_layers)}
    if len(names) != 1:
        raise DesignError(f"{run_dirs[0]} mixes mixers {sorted(names)}; design-hybrid starts from a model whose every "
                          f"layer is one SP-KV mixer")
    (mixer_name,) = names
    if getattr(m.mixers[mixer_name], "spkv", None) is None:
        raise DesignError(f"{run_dirs[0]}: mixer {mixer_name!r} has no spkv; design-hybrid needs an SP-KV run")
    return cfg


def mean_densities(run_dirs: Sequence[Path], labels: list[str], n_kv_heads: int,
                   max_density: float) -> tuple[list[int], list[list[float]]]:
    """(each run's eval step, the per-(layer, KV head) densities averaged over the runs); refuses a run whose gates
    keep at least `max_density` of the older keys on average."""
    steps, per_run = [], []
    for d in run_dirs:
        step, dens = head_densities(d, labels, n_kv_heads)
        flat = [x for layer in dens for x in layer]
        mean = sum(flat) / len(flat)
        if mean >= max_density:
            raise DesignError(f"{d}: its gates keep {mean:.3f} of the older keys (>= --max-density {max_density:g}), "
                              f"so it has not learned which heads need far context; train it through its hard-gate "
                              f"anneal or longer, or design from runs that prune")
        steps.append(step)
        per_run.append(dens)
    return steps, [[sum(r[i][h] for r in per_run) / len(per_run) for h in range(len(per_run[0][i]))]
                   for i in range(len(labels))]


def design(run_dirs: str | Path | Sequence[str | Path], budget: float, *, per_head: bool = False, rest: str = LOCAL,
           window: int | None = None, context: int | None = None, linear_kind: str = "lightning",
           name: str | None = None, min_runs: int = MIN_RUNS, max_density: float = MAX_DENSITY) -> Design:
    """The layout for the SP-KV runs `run_dirs` (seeds of one config) under `budget` (see the module docstring)."""
    dirs = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(d) for d in run_dirs]
    if len(set(dirs)) != len(dirs):
        raise DesignError(f"a run is given twice: {' '.join(map(str, dirs))}")
    if len(dirs) < min_runs:
        raise DesignError(f"{len(dirs)} run(s) given, --min-runs is {min_runs}: give the SP-KV runs of at least "
                          f"{min_runs} seeds (one seed's densities are its own noise)")
    if not 0 < budget <= 1:
        raise DesignError(f"--budget must be a fraction in (0, 1] of the all-global model's KV cache, got {budget}")
    if rest not in (LOCAL, LINEAR):
        raise DesignError(f"--rest must be {LOCAL} or {LINEAR}, got {rest!r}")
    if per_head and rest != LOCAL:
        raise DesignError("--per-head turns heads local (a sliding window); a layer cannot be partly linear, so use "
                          "--rest local")
    cfg = _source(dirs)
    m = cfg.model
    mixer_name = m.mixer_for_layer(0)[0]
    source = m.mixers[mixer_name]
    window = window or source.spkv.window
    context = context or cfg.data.seq_len
    labels = [f"layer{i}.{mixer_name}" for i in range(m.n_layers)]
    steps, dens = mean_densities(dirs, labels, source.kv_heads(), max_density)

    dense_mixer = source.model_copy(update={"spkv": None})
    mixers = {GLOBAL: dense_mixer}
    if rest == LOCAL:
        if not hasattr(dense_mixer, "sliding_window"):
            raise DesignError(f"mixer kind {dense_mixer.kind!r} has no sliding window; use --rest linear")
        mixers[LOCAL] = dense_mixer.model_copy(update={"sliding_window": min(window, cfg.data.seq_len)})
    else:
        mixers[LINEAR] = _linear_mixer(linear_kind, dense_mixer)

    n_heads = [len(d) for d in dens]

    def layout_of(global_units: set[tuple[int, int]]) -> tuple[list[str], dict]:
        """Per-layer mixer names and the mixers they use, for the (layer, KV head) units that stay global."""
        names, used = [], {}
        for i, H in enumerate(n_heads):
            glob = [h for h in range(H) if (i, h) in global_units]
            if len(glob) in (0, H):
                names.append(GLOBAL if glob else rest)
            else:
                names.append(f"layer{i}")
                used[f"layer{i}"] = mixers[LOCAL].model_copy(
                    update={"local_heads": [h for h in range(H) if h not in glob]})
        used |= {k: v for k, v in mixers.items() if k in names}
        return names, used

    def with_layout(global_units: set[tuple[int, int]], run_name: str) -> Config:
        names, used = layout_of(global_units)
        raw = cfg.to_dict()
        raw["model"]["mixers"] = {k: v.model_dump() for k, v in used.items()}
        raw["model"]["pattern"] = names
        raw["run"]["name"] = run_name
        return load_config(None, raw=raw)

    # The (layer, KV head) units in the order they stay global, taken `per_step` at a time (a head, or a layer).
    units = [(i, h) for i, H in enumerate(n_heads) for h in range(H)]
    if per_head:
        order, per_step = sorted(units, key=lambda u: (-dens[u[0]][u[1]], u)), 1
    else:
        layers = sorted(range(m.n_layers), key=lambda i: (-sum(dens[i]) / n_heads[i], i))
        order, per_step = [(i, h) for i in layers for h in range(n_heads[i])], n_heads[0]
    full = sum(layer_costs(with_layout(set(units), "all-global"), context))

    def cost(g: int) -> float:
        return sum(layer_costs(with_layout(set(order[:g * per_step]), "probe"), context)) / full

    # The cost grows with the number of global units: the largest count within the budget, by bisection.
    lo, hi = 0, len(order) // per_step
    if cost(lo) > budget + 1e-12:
        raise DesignError(f"--budget {budget} is below the cost of a model with no global layer "
                          f"({cost(lo):.3f} of all-global at context {context}); raise it or lower --window")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget + 1e-12 else (lo, mid - 1)
    chosen = set(order[:lo * per_step])
    layout, _ = layout_of(chosen)
    base_name = re.sub(r"-s\d+$", "", cfg.run.name)  # the seeds' common name
    run_name = name or f"{base_name}-hybrid{'-heads' if per_head else ''}{budget:g}"
    return Design([str(d) for d in dirs], steps, dens, layout,
                  [[h for h in range(H) if (i, h) in chosen] for i, H in enumerate(n_heads)], per_head, budget,
                  cost(lo), context, window, rest, with_layout(chosen, run_name))


def _linear_mixer(kind: str, dense):
    from attention import MIXERS

    if kind not in MIXERS or kind in ("softmax", "cca"):
        raise DesignError(f"--linear-kind must name a linear mixer (lightning, kda), got {kind!r}")
    return MIXERS[kind].config.model_validate({"kind": kind, "n_heads": dense.n_heads})


def layer_costs(cfg: Config, context: int) -> list[int]:
    """Decode-cache bytes per sequence of each layer at `context` tokens (a sliding window's ring is fixed)."""
    mdef, shapes = abstract_model(cfg)
    model = mdef.merge(shapes)
    return [b.mixer.cache_bytes_per_token() * context + b.mixer.state_bytes() for b in model.blocks]


def render(d: Design, base: str | None = None, notes: Sequence[str] = ()) -> str:
    """The config file: a header with the derivation (and `notes`, more lines of it), then the resolved config; or,
    with `base` (a config path as the file should name it), `base:` and only what the design sets (run.name,
    model.pattern, model.mixers)."""
    flag = " --per-head" if d.per_head else ""
    lines = [f"# Designed by `attnlab design-hybrid {' '.join(d.run_dirs)}{flag} --budget {d.budget:g} --rest "
             f"{d.rest}` from the SP-KV gate densities of {len(d.run_dirs)} run(s) (evals at steps "
             f"{', '.join(map(str, d.steps))}), averaged."]
    if d.per_head:
        lines += [f"# Layer {i} density per KV head: {', '.join(f'{x:.3f}' for x in row)}; global heads "
                  f"{d.global_heads[i]}." for i, row in enumerate(d.head_densities)]
    else:
        lines.append(f"# Per-layer density (mean over KV heads): {', '.join(f'{x:.3f}' for x in d.densities)}.")
    lines.append(f"# Layout: {', '.join(d.layout)}; decode cache {d.cost:.3f} of the all-global model at {d.context} "
                 f"tokens (local heads hold the last {d.window} keys).")
    lines += [f"# {note}" for note in notes]
    if base is None:
        return "\n".join(lines) + "\n" + dump_config(d.config)
    full = d.config.to_dict()
    body = {"base": base, "run": {"name": full["run"]["name"]},
            "model": {"pattern": full["model"]["pattern"], "mixers": full["model"]["mixers"]}}
    return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False)


def cmd_design_hybrid(args) -> int:
    if args.out:  # checked before the run is read; a mistyped directory is not created
        out = Path(args.out)
        if out.is_dir():
            raise DesignError(f"--out {args.out} is a directory; give the YAML file to write, e.g. "
                              f"{out / 'hybrid.yaml'}")
        if not out.parent.is_dir():
            raise DesignError(f"--out {args.out}: directory {out.parent} does not exist; create it first "
                              f"(mkdir -p {out.parent}) or write somewhere else")
    try:
        d = design(args.run_dirs, args.budget, per_head=args.per_head, rest=args.rest, window=args.window,
                   context=args.context, linear_kind=args.linear_kind, name=args.name, min_runs=args.min_runs,
                   max_density=args.max_density)
    except ConfigError as e:
        raise DesignError(f"{' '.join(args.run_dirs)}: {str(e).splitlines()[0]}") from None
    base = None
    if args.base:
        where = Path(args.out).parent if args.out else Path.cwd()
        base = os.path.relpath(Path(args.base).resolve(), where.resolve())
    text = render(d, base)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        print(json.dumps({**d.summary(), "out": args.out}))
    else:
        what = f"global heads {d.global_heads}" if d.per_head else f"global layers {d.summary()['global_layers']}"
        print(f"layout {' '.join(d.layout)}: {what}, cache {d.cost:.3f} of all-global at {d.context} tokens "
              f"(budget {d.budget:g})" + (f"; config written to {args.out}" if args.out else ""))
        if not args.out:
            print(text)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("design-hybrid", help="a hybrid layout (global + local or linear layers, or global + local "
                                             "heads) under a KV budget, from SP-KV runs' measured gate densities")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="trained SP-KV runs of one config, one per seed (their metrics.jsonl hold spkv_density_heads)")
    p.add_argument("--budget", type=float, required=True,
                   help="decode-cache bytes as a fraction of the same model with every layer global, e.g. 0.35")
    p.add_argument("--per-head", action="store_true",
                   help="choose (layer, KV head) pairs, not layers: the densest heads global, the rest local")
    p.add_argument("--rest", choices=[LOCAL, LINEAR], default=LOCAL,
                   help="what the layers that do not stay global become (default local: a sliding window)")
    p.add_argument("--window", type=int, default=None, help="local heads' window (default: the SP-KV window)")
    p.add_argument("--context", type=int, default=None, help="context length the budget is computed at "
                                                             "(default: the runs' seq_len)")
    p.add_argument("--min-runs", type=int, default=MIN_RUNS,
                   help=f"fewest runs (seeds) to average (default {MIN_RUNS})")
    p.add_argument("--max-density", type=float, default=MAX_DENSITY,
                   help=f"refuse a run whose gates keep this share of older keys or more (default {MAX_DENSITY}): "
                        "it has not learned to prune")
    p.add_argument("--linear-kind", default="lightning", help="the mixer of linear layers (lightning or kda)")
    p.add_argument("--name", default=None, help="run.name of the designed config (default <run>-hybrid[-heads]<F>)")
    p.add_argument("--out", default=None, help="write the config here (default: print it)")
    p.add_argument("--base", default=None, metavar="CONFIG",
                   help="write `base: CONFIG` and only the layout (pattern, mixers, run.name) instead of the whole "
                        "resolved config (which names the run's absolute data path)")
    p.add_argument("--json", action="store_true", help="print the derivation as one JSON object")
    p.set_defaults(fn=cmd_design_hybrid)
