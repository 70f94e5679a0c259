"""`attnlab design-hybrid RUN_DIR --budget F`: a hybrid layer layout derived from an SP-KV run's measured gate
densities.

An SP-KV run logs, at each eval, the density of every (layer, KV head): the fraction of the keys that have left
the local window which its gate keeps (`spkv_density_heads` in metrics.jsonl). A layer whose gates keep many
keys uses far context; one that keeps few can be local. The layout keeps the densest layers global (full
attention, every key cached) and turns the others into `local` layers (a sliding window of W keys) or
`linear` layers (a fixed-size recurrent state), as many global layers as the KV budget allows.

Cost model: the bytes one sequence's decode cache holds at context length T (default: the run's seq_len),
layer by layer (the mixers' `cache_bytes_per_token * T + state_bytes`): a global layer `per_token * T`, a local
layer `per_token * W` (its decode cache is a ring of the last W keys), a linear layer its fixed state, plus any
fixed state (short-conv history) of each layer. The budget F is
a fraction of the same model with every layer global and no SP-KV. The number of global layers is the largest
that fits; which layers they are follows the densities (mean over a layer's KV heads; ties to the earlier
layer).

The output is a complete config (the run's resolved config with `model.pattern` spelled out per layer, the
mixers `global`, `local` / `linear`, and a new run.name), with a header saying how it was derived.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import yaml

from lm.config import Config, ConfigError, dump_config, load_config
from lm.model import abstract_model
from lm.tracking import read_metrics

GLOBAL, LOCAL, LINEAR = "global", "local", "linear"


class DesignError(ValueError):
    """The run cannot be designed from (no SP-KV, no densities) or the budget cannot be met."""


@dataclasses.dataclass
class Design:
    """The derived layout and the numbers behind it."""

    run_dir: str
    step: int  # the eval step whose densities were used
    densities: list[float]  # per layer, mean over its KV heads
    layout: list[str]  # per layer: global | local | linear
    budget: float
    cost: float  # the layout's cache bytes per sequence at `context`, as a fraction of all-global
    context: int
    window: int
    rest: str
    config: Config

    def summary(self) -> dict:
        return {"run_dir": self.run_dir, "step": self.step, "densities": self.densities, "layout": self.layout,
                "budget": self.budget, "cost": self.cost, "context": self.context, "window": self.window,
                "rest": self.rest, "global_layers": [i for i, k in enumerate(self.layout) if k == GLOBAL]}


def layer_densities(run_dir: Path, n_layers: int, labels: list[str]) -> tuple[int, list[float]]:
    """(step, mean density per layer) from the newest eval record with per-head densities."""
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
    return int(last["step"]), [float(sum(heads[lb]) / len(heads[lb])) for lb in labels]


def design(run_dir: str | Path, budget: float, *, rest: str = LOCAL, window: int | None = None,
           context: int | None = None, linear_kind: str = "lightning", name: str | None = None) -> Design:
    """The layout for `run_dir` under `budget` (see the module docstring)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise DesignError(f"{run_dir} is not a run directory (no config.yaml)")
    if not 0 < budget <= 1:
        raise DesignError(f"--budget must be a fraction in (0, 1] of the all-global model's KV cache, got {budget}")
    if rest not in (LOCAL, LINEAR):
        raise DesignError(f"--rest must be {LOCAL} or {LINEAR}, got {rest!r}")
    cfg = load_config(run_dir / "config.yaml")
    m = cfg.model
    names = {m.mixer_for_layer(i)[0] for i in range(m.n_layers)}
    if len(names) != 1:
        raise DesignError(f"{run_dir} mixes mixers {sorted(names)}; design-hybrid starts from a model whose every "
                          f"layer is one SP-KV mixer")
    (mixer_name,) = names
    source = m.mixers[mixer_name]
    if getattr(source, "spkv", None) is None:
        raise DesignError(f"{run_dir}: mixer {mixer_name!r} has no spkv; design-hybrid needs an SP-KV run")
    window = window or source.spkv.window
    context = context or cfg.data.seq_len
    labels = [f"layer{i}.{mixer_name}" for i in range(m.n_layers)]
    step, dens = layer_densities(run_dir, m.n_layers, labels)

    dense_mixer = source.model_copy(update={"spkv": None})
    mixers = {GLOBAL: dense_mixer}
    if rest == LOCAL:
        if not hasattr(dense_mixer, "sliding_window"):
            raise DesignError(f"mixer kind {dense_mixer.kind!r} has no sliding window; use --rest linear")
        mixers[LOCAL] = dense_mixer.model_copy(update={"sliding_window": min(window, cfg.data.seq_len)})
    else:
        mixers[LINEAR] = _linear_mixer(linear_kind, dense_mixer)

    def with_layout(layout: list[str], run_name: str) -> Config:
        used = {k: v.model_dump() for k, v in mixers.items() if k in layout}
        raw = cfg.to_dict()
        raw["model"]["mixers"] = used
        raw["model"]["pattern"] = layout
        raw["run"]["name"] = run_name
        return load_config(None, raw=raw)

    all_global = layer_costs(with_layout([GLOBAL] * m.n_layers, "all-global"), context)
    full = sum(all_global)
    order = sorted(range(m.n_layers), key=lambda i: (-dens[i], i))
    best = None
    for g in range(m.n_layers, -1, -1):
        layout = [GLOBAL if i in order[:g] else rest for i in range(m.n_layers)]
        cost = sum(layer_costs(with_layout(layout, "probe"), context)) / full
        if cost <= budget + 1e-12:
            best = (layout, cost)
            break
    if best is None:
        raise DesignError(f"--budget {budget} is below the cost of a model with no global layer "
                          f"({cost:.3f} of all-global at context {context}); raise it or lower --window")
    layout, cost = best
    run_name = name or f"{cfg.run.name}-hybrid{budget:g}"
    return Design(str(run_dir), step, dens, layout, budget, cost, context, window, rest, with_layout(layout, run_name))


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


def render(d: Design, base: str | None = None) -> str:
    """The config file: a header with the derivation, then the resolved config; or, with `base` (a config path
    as the file should name it), `base:` and only what the design sets (run.name, model.pattern, model.mixers)."""
    lines = [f"# Designed by `attnlab design-hybrid {d.run_dir} --budget {d.budget:g} --rest {d.rest}` from the "
             f"SP-KV gate densities of its eval at step {d.step}.",
             f"# Per-layer density (mean over KV heads): {', '.join(f'{x:.3f}' for x in d.densities)}.",
             f"# Layout: {', '.join(d.layout)}; decode cache {d.cost:.3f} of the all-global model at {d.context} "
             f"tokens (local layers hold the last {d.window} keys)."]
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
            raise DesignError(f"--out {args.out} is a directory; give the YAML file to write, e.g. {out / 'hybrid.yaml'}")
        if not out.parent.is_dir():
            raise DesignError(f"--out {args.out}: directory {out.parent} does not exist; create it first "
                              f"(mkdir -p {out.parent}) or write somewhere else")
    try:
        d = design(args.run_dir, args.budget, rest=args.rest, window=args.window, context=args.context,
                   linear_kind=args.linear_kind, name=args.name)
    except ConfigError as e:
        raise DesignError(f"{args.run_dir}: {str(e).splitlines()[0]}") from None
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
        glob = d.summary()["global_layers"]
        print(f"layout {' '.join(d.layout)}: global layers {glob}, cache {d.cost:.3f} of all-global at "
              f"{d.context} tokens (budget {d.budget:g})" + (f"; config written to {args.out}" if args.out else ""))
        if not args.out:
            print(text)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("design-hybrid", help="a hybrid layout (global + local or linear layers) under a KV budget, "
                                             "from an SP-KV run's measured gate densities")
    p.add_argument("run_dir", help="a trained SP-KV run directory (its metrics.jsonl holds spkv_density_heads)")
    p.add_argument("--budget", type=float, required=True,
                   help="decode-cache bytes as a fraction of the same model with every layer global, e.g. 0.35")
    p.add_argument("--rest", choices=[LOCAL, LINEAR], default=LOCAL,
                   help="what the layers that do not stay global become (default local: a sliding window)")
    p.add_argument("--window", type=int, default=None, help="local layers' window (default: the SP-KV window)")
    p.add_argument("--context", type=int, default=None, help="context length the budget is computed at "
                                                             "(default: the run's seq_len)")
    p.add_argument("--linear-kind", default="lightning", help="the mixer of linear layers (lightning or kda)")
    p.add_argument("--name", default=None, help="run.name of the designed config (default <run>-hybrid<F>)")
    p.add_argument("--out", default=None, help="write the config here (default: print it)")
    p.add_argument("--base", default=None, metavar="CONFIG",
                   help="write `base: CONFIG` and only the layout (pattern, mixers, run.name) instead of the whole "
                        "resolved config (which names the run's absolute data path)")
    p.add_argument("--json", action="store_true", help="print the derivation as one JSON object")
    p.set_defaults(fn=cmd_design_hybrid)

