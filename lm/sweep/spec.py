"""Sweep specs: a YAML file that says "these configs x these overrides x these seeds", loaded, validated and
expanded into runs.

    name: projection_sharing_tiny        # the sweep directory's name: runs go to <out_dir>/<name>/<run name>/
    description: ...                     # free text (optional)
    group: projection-sharing-tiny       # W&B group of every run (default: name)
    baseline: softmax                    # the variant the report's paired differences are against (default: the first);
                                         # with an overrides axis, a config label pairs within each override
    metric: eval_loss                    # the final eval metric the report compares (eval_acc for recall tasks)
    contrasts: [[ccgqa, gqa4]]           # more pairs the report compares seed by seed (variant, its reference)
    seeds: [0, 1, 2]
    out_dir: runs/sweeps                 # (default runs/sweeps)
    common: {train.steps: 100}           # overrides every run gets
    configs:                             # label -> config file, or label -> {config, set, init_from}
      softmax: configs/tiny/softmax.yaml
      spkv: {config: configs/tiny/spkv.yaml, set: {model.mixers.softmax.spkv.init_bias: 1.0}}
      spkv_adapted: {config: configs/tiny/spkv.yaml, init_from: softmax}
    overrides: {lr3e-3: {optim.lr: 3e-3}}  # optional axis: variants = configs x overrides
    tune: {key: optim.lr, values: [1.0e-3, 2.0e-3, 4.0e-3], seed: 0, extend: 2}   # optional: per variant, the
                                         # best value of `key` on one seed, then every seed at that value
    evals:                               # optional: inference-time variants, a trained variant's checkpoints
      dense_h2o: {of: dense, cache_policy: h2o, cache_budget: 72}   # scored again through pruned caches
      spkv_tau07: {of: spkv, set: {model.mixers.softmax.spkv.threshold: 0.7}}   # or with eval-time settings
    cluster: {slurm: {...}, tpu_vm: {...}} # defaults of `attnlab sweep --emit` (see CLUSTER_KEYS)

A variant is a config label, or `<config label>-<override label>` with an overrides axis; a run is a variant
and a seed, named `<variant>-s<seed>`. Override mappings may nest (`train: {steps: 100}` is `train.steps: 100`).
`init_from` names the variant (or, with an overrides axis, the config label: the same override is meant) whose
run of the same seed the run starts from (`attnlab train --init-from`); such runs come after their source.
Config paths are relative to the directory the command runs in (the repository root).

With `tune`, each variant first runs once per value on the tune seed (`<variant>-<key's last part><value>-s<seed>`,
e.g. `softmax-lr0.002-s0`); once a variant's tuning runs have ended, its runs for every seed use the value whose
final eval was best by `metric` (a diverged tuning run counts as worst). The run of the tune seed at the chosen
value is that tuning run, not a second training. `with_choices` builds those runs once the values are known
(lm/sweep/tune.py reads them from the tuning runs). With `extend: N` (numeric values, increasing, above 0), a
variant whose best value is the largest (smallest) it tried first tries the next one beyond, at the ratio of the
grid's last (first) two values, up to N beyond each end: a best value at the edge of the grid says a better one
may lie outside it, and tuning only the variants that need it costs far less than widening the grid for all.
`with_extensions` adds those tuning runs.

Every problem is a one-line `ConfigError` naming the spec file and the key. Every run's config is loaded
(`lm.config.load_config`) when the spec is, so a mistyped key fails before anything trains.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from lm.config import Config, ConfigError, _Loader, load_config, parse_yaml

TOP_KEYS = ("name", "description", "group", "baseline", "metric", "contrasts", "seeds", "out_dir", "common",
            "configs", "overrides", "tune", "evals", "cluster")
TUNE_KEYS = ("key", "values", "seed", "extend")
EVAL_KEYS = ("of", "set", "cache_policy", "cache_budget", "cache_window")
METRICS = ("eval_loss", "eval_bpb", "eval_ppl", "eval_acc")  # what a report may compare by default
CONFIG_KEYS = ("config", "set", "init_from")
# Cluster settings: key -> (type, help shown in errors). Every key is optional.
CLUSTER_KEYS: dict[str, dict[str, type]] = {
    "slurm": {"partition": str, "account": str, "nodes": int, "gpus_per_node": int, "cpus_per_task": int, "mem": str,
              "exclusive": bool, "time": str, "grace": int, "max_running": int, "setup": list},
    "tpu_vm": {"name": str, "zone": str, "project": str, "accelerator_type": str, "workers": int, "repo_dir": str,
               "bucket": str, "setup": list},
}
DEFAULT_OUT_DIR = "runs/sweeps"
_LABEL = re.compile(r"[A-Za-z0-9_.+-]+")
_SLURM_TIME = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the sweep: a config file with its own overrides (per-config `set`, then the override axis)."""

    label: str
    config: str
    overrides: tuple[str, ...]
    init_from: str | None = None  # the variant whose run of the same seed this one starts from
    config_label: str = ""  # the configs entry it comes from
    axis_label: str | None = None  # its overrides-axis label, if the sweep has one


@dataclasses.dataclass(frozen=True)
class Run:
    """One training: `attnlab train config --set <overrides> [--init-from init_from]`."""

    name: str
    variant: str
    seed: int
    config: str
    overrides: tuple[str, ...]  # every override, in the order they apply
    run_dir: str
    init_from: str | None = None  # the source run's directory
    init_from_run: str | None = None  # the source run's name
    cfg: Config | None = dataclasses.field(default=None, compare=False, repr=False)
    stage: str = "main"  # "tune": a tuning run of a `tune` sweep
    reuses: str | None = None  # the tuning run that is this run (the tune seed at the chosen value)

    def argv(self) -> list[str]:
        """The `attnlab train` command line of this run."""
        out = ["attnlab", "train", self.config]
        for o in self.overrides:
            out += ["--set", o]
        return out + (["--init-from", self.init_from] if self.init_from else [])


@dataclasses.dataclass(frozen=True)
class Tune:
    """`tune:` of a spec: the config key tuned per variant, the values tried, and the seed they are tried on."""

    key: str
    values: tuple[Any, ...]
    seed: int
    extend: int = 0  # values each variant may try beyond each end of `values` when its best is at that end

    def tag(self, value: Any) -> str:
        """'lr0.002' for optim.lr = 0.002: the key's last part and the value, for run names."""
        return f"{self.key.rsplit('.', 1)[-1]}{format_value(value)}"

    def beyond(self, tried: tuple[Any, ...], upward: bool) -> Any | None:
        """The next value past the largest (`upward`) or smallest of `tried` (the grid and the values already
        added beyond it), at the ratio of the grid's two values at that end; None when `extend` values already
        lie beyond that end."""
        grid = self.values
        past = [x for x in tried if (x > grid[-1] if upward else x < grid[0])]
        if len(past) >= self.extend:
            return None
        ratio = grid[-1] / grid[-2] if upward else grid[0] / grid[1]
        edge = max(tried) if upward else min(tried)
        return float(f"{edge * ratio:.6g}")


@dataclasses.dataclass(frozen=True)
class EvalVariant:
    """An inference-time variant: each seed's run of variant `of`, its final checkpoint scored again on the batches
    its training evals scored, with `overrides` (e.g. the SP-KV threshold) and, with `cache_policy`, decoding
    through pruned caches of `cache_budget` keys per layer and KV head (attention/cache_policies.py)."""

    label: str
    of: str
    overrides: tuple[str, ...] = ()
    cache_policy: str | None = None
    cache_budget: int | None = None
    cache_window: int | None = None

    def settings(self) -> dict[str, Any]:
        return {"of": self.of, "overrides": list(self.overrides), "cache_policy": self.cache_policy,
                "cache_budget": self.cache_budget, "cache_window": self.cache_window}


@dataclasses.dataclass(frozen=True)
class Sweep:
    path: str  # the spec file, as the user named it (relative to the working directory when inside it)
    name: str
    description: str
    group: str
    baseline: str
    seeds: tuple[int, ...]
    out_dir: str
    common: tuple[str, ...]
    variants: tuple[Variant, ...]
    runs: tuple[Run, ...]
    cluster: dict[str, dict[str, Any]]
    configs: tuple[str, ...] = ()  # the config labels
    axis: tuple[str, ...] = ()  # the overrides axis's labels (empty without one)
    metric: str = "eval_loss"  # what the report compares
    contrasts: tuple[tuple[str, str], ...] = ()  # (variant, its reference): more pairs the report compares
    tune: Tune | None = None
    choices: dict[str, Any] = dataclasses.field(default_factory=dict)  # variant -> the tuned value chosen
    extensions: dict[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)  # variant -> values tried
    #                                                                   beyond tune.values (tune.extend)
    common_overrides: tuple[str, ...] = ()  # what every run gets (kept to build the tuned runs later)
    evals: tuple[EvalVariant, ...] = ()

    @property
    def waiting(self) -> tuple[str, ...]:
        """The variants whose runs wait for their tuning to end (a value to be chosen)."""
        return tuple(v.label for v in self.variants if self.tune and v.label not in self.choices)

    @property
    def sweep_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def tried(self, variant: str) -> tuple[Any, ...]:
        """The values of the tuned key `variant` tries: the grid, then any beyond it."""
        return (*self.tune.values, *self.extensions.get(variant, ())) if self.tune else ()

    @property
    def manifest_path(self) -> Path:
        return self.sweep_dir / "sweep.json"


def format_value(value: Any) -> str:
    """The text of `--set KEY=TEXT` that lm.config reads back as `value` (YAML), e.g. 0.003, true, [kda, global]."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        try:
            if value and parse_yaml(value) == value and value == value.strip() and "\n" not in value:
                return value
        except yaml.YAMLError:
            pass
        return json.dumps(value)
    return json.dumps(value)  # lists and mappings: JSON is YAML's flow style


class _SpecLoader(_Loader):
    """lm.config's YAML reading (1e-3 is a float), refusing a key given twice in one mapping: a label written
    twice would otherwise silently keep only the last."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


class _DuplicateKey(Exception):
    def __init__(self, key, line):
        super().__init__(key, line)
        self.key, self.line = key, line


def display_path(path: str | Path) -> str:
    """`path` relative to the working directory when it is inside it, else as given."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


class _Spec:
    """Reads one spec file; `fail(key, msg)` raises the one-line error."""

    def __init__(self, path: str | Path):
        self.path = display_path(path)
        self.file = Path(path)

    def fail(self, key: str, msg: str):
        raise ConfigError(f"{self.path}: {key}: {msg}" if key else f"{self.path}: {msg}")

    def read(self) -> dict:
        try:
            text = self.file.read_text()
        except FileNotFoundError:
            raise ConfigError(f"sweep spec {self.path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"sweep spec {self.path} is a directory, not a YAML file") from None
        try:
            data = yaml.load(text, Loader=_SpecLoader)
        except _DuplicateKey as e:
            self.fail(f"line {e.line}", f"{e.key!r} is given twice; each key and label may appear once")
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            self.fail(f"line {mark.line + 1}" if mark else "", f"not valid YAML ({getattr(e, 'problem', None) or e})")
        if not isinstance(data, dict):
            self.fail("", "the top level must be a mapping (name, seeds, configs, ...)")
        for key in data:
            if key not in TOP_KEYS:
                near = difflib.get_close_matches(str(key), TOP_KEYS, n=1, cutoff=0.5)
                hint = f"did you mean {near[0]}?" if near else f"valid keys: {', '.join(TOP_KEYS)}"
                self.fail(str(key), f"unknown key ({hint})")
        for key in ("name", "seeds", "configs"):
            if key not in data:
                self.fail(key, "missing (a spec needs name, seeds and configs)")
        return data

    def string(self, data: dict, key: str, default: str | None = None, *, label: bool = False) -> str:
        value = data.get(key, default)
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"must be a non-empty string (got {value!r})")
        if label and not _LABEL.fullmatch(value):
            self.fail(key, f"{value!r} may only contain letters, digits and _.+-")
        return value

    def mapping(self, value: Any, key: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, f"must be a mapping (got {type(value).__name__} {value!r})")
        return value

    def overrides(self, value: Any, key: str) -> tuple[str, ...]:
        """A mapping of (dotted, possibly nested) config keys to values, as KEY=VALUE strings."""
        out: list[str] = []

        def walk(node: dict, prefix: str, where: str) -> None:
            for k, v in self.mapping(node, where).items():
                if not isinstance(k, str) or not k or any(not p for p in k.split(".")):
                    self.fail(where, f"{k!r} is not a dotted config key like optim.lr")
                if isinstance(v, dict) and v:
                    walk(v, f"{prefix}{k}.", f"{where}.{k}")
                else:
                    text = format_value(v)
                    if parse_yaml(text) != v and not (isinstance(v, float) and math.isnan(v)):
                        self.fail(f"{where}.{k}", f"value {v!r} cannot be passed as --set text")
                    out.append(f"{prefix}{k}={text}")

        walk(value, "", key)
        return tuple(out)

    def labels(self, data: dict, key: str, *, required: bool) -> dict:
        value = self.mapping(data.get(key), key)
        if required and not value:
            self.fail(key, "must map at least one label to a config file")
        for label in value:
            if not isinstance(label, str) or not _LABEL.fullmatch(label):
                self.fail(f"{key}.{label}", "a label may only contain letters, digits and _.+-")
        return value


def _config_entry(spec: _Spec, label: str, raw: Any) -> tuple[str, tuple[str, ...], str | None]:
    """(config path, its own overrides, init_from) of one `configs:` entry."""
    key = f"configs.{label}"
    if isinstance(raw, str):
        raw = {"config": raw}
    if not isinstance(raw, dict):
        spec.fail(key, f"must be a config file path or a mapping with config, set, init_from (got {raw!r})")
    for k in raw:
        if k not in CONFIG_KEYS:
            near = difflib.get_close_matches(str(k), CONFIG_KEYS, n=1, cutoff=0.5)
            hint = f"did you mean {near[0]}?" if near else f"valid: {', '.join(CONFIG_KEYS)}"
            spec.fail(f"{key}.{k}", f"unknown key ({hint})")
    if "config" not in raw:
        spec.fail(f"{key}.config", "missing: the config file of this label")
    path = raw["config"]
    if not isinstance(path, str) or not path.strip():
        spec.fail(f"{key}.config", f"must be a config file path (got {path!r})")
    if not Path(path).is_file():
        spec.fail(key, f"config file {path} does not exist (paths are relative to the directory the command runs "
                       f"in, the repository root)")
    init_from = raw.get("init_from")
    if init_from is not None and not isinstance(init_from, str):
        spec.fail(f"{key}.init_from", f"must be a variant label (got {init_from!r})")
    return path, spec.overrides(raw.get("set"), f"{key}.set"), init_from


def _variants(spec: _Spec, configs: dict, axis: dict) -> list[Variant]:
    """configs x overrides, each with its init_from resolved to a variant label; sources ordered first."""
    entries = {label: _config_entry(spec, label, raw) for label, raw in configs.items()}
    axis_sets = {o: spec.overrides(v if v is not None else {}, f"overrides.{o}") for o, v in axis.items()}
    variants: dict[str, Variant] = {}
    made_by: dict[str, str] = {}  # variant -> the config label it comes from
    for label, (path, own, init_from) in entries.items():
        for o in (axis_sets or {None: ()}):
            name = label if o is None else f"{label}-{o}"
            if name in variants:
                spec.fail(f"configs.{label}" + (f" x overrides.{o}" if o else ""),
                          f"variant label {name!r} is made twice (also by configs.{made_by[name]}); rename a label")
            # With an overrides axis, a config label as init_from means that config's run with the same override.
            source = f"{init_from}-{o}" if (o is not None and init_from in entries) else init_from
            variants[name] = Variant(name, path, own + (axis_sets[o] if o is not None else ()), source, label, o)
            made_by[name] = label
    for v in variants.values():
        where = f"configs.{made_by[v.label]}.init_from"
        if v.init_from is not None and v.init_from not in variants:
            spec.fail(where, f"{entries[made_by[v.label]][2]!r} is not a variant (variants: {', '.join(variants)})")
        if v.init_from == v.label:
            spec.fail(where, "a run cannot start from itself")
    return _ordered(spec, variants)


def _ordered(spec: _Spec, variants: dict[str, Variant]) -> list[Variant]:
    """The variants in spec order, except that a variant's init_from source comes before it."""
    out: list[Variant] = []
    state: dict[str, str] = {}

    def visit(v: Variant, chain: tuple[str, ...]) -> None:
        if state.get(v.label) == "done":
            return
        if v.label in chain:
            spec.fail("configs", f"init_from loops back: {' -> '.join(chain + (v.label,))}")
        if v.init_from is not None:
            visit(variants[v.init_from], chain + (v.label,))
        state[v.label] = "done"
        out.append(v)

    for v in variants.values():
        visit(v, ())
    return out


def _first_line_errors(e: ConfigError) -> str:
    """A load_config error (one line per problem) as one line, without the `--set:` origin the spec key replaces."""
    lines = [ln.removeprefix("--set: ") for ln in str(e).splitlines() if ln.strip()]
    return "; ".join(lines)


def _check_loads(spec: _Spec, variants: list[Variant], common: tuple[str, ...], configs: dict, axis: dict) -> None:
    """Load each group of overrides on its own first, so a bad key is reported under the spec key that holds it."""
    first = variants[0].config

    def load(key: str, path: str, overrides: tuple[str, ...]) -> None:
        try:
            load_config(path, list(overrides))
        except ConfigError as e:
            spec.fail(key, _first_line_errors(e))

    load("common", first, common)
    own = {}
    for label, raw in configs.items():
        path, sets, _ = _config_entry(spec, label, raw)
        own[label] = (path, sets)
        load(f"configs.{label}", path, common + sets)
    path, sets = next(iter(own.values()))
    for o, v in axis.items():
        load(f"overrides.{o}", path, common + sets + spec.overrides(v if v is not None else {}, f"overrides.{o}"))


def _cluster(spec: _Spec, value: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for kind, settings in spec.mapping(value, "cluster").items():
        if kind not in CLUSTER_KEYS:
            spec.fail(f"cluster.{kind}", f"unknown cluster kind (valid: {', '.join(CLUSTER_KEYS)})")
        keys = CLUSTER_KEYS[kind]
        out[kind] = {}
        for k, v in spec.mapping(settings, f"cluster.{kind}").items():
            where = f"cluster.{kind}.{k}"
            if k not in keys:
                near = difflib.get_close_matches(str(k), keys, n=1, cutoff=0.5)
                spec.fail(where, f"unknown key ({f'did you mean {near[0]}?' if near else 'valid: ' + ', '.join(keys)})")
            if v is None:
                continue
            out[kind][k] = check_cluster_value(kind, k, v, lambda msg, where=where: spec.fail(where, msg))
    return out


def check_cluster_value(kind: str, key: str, value: Any, fail) -> Any:
    """`value` for cluster.<kind>.<key>, checked; `fail(msg)` raises."""
    want = CLUSTER_KEYS[kind][key]
    if key == "time" and isinstance(value, int) and not isinstance(value, bool):
        fail("write the time limit as a quoted string, e.g. \"24:00:00\" (unquoted, YAML reads it as a number)")
    if key == "mem" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # 0 (the whole node) or megabytes, as SLURM reads a bare number
    if want is int:
        least = 0 if key == "gpus_per_node" else 1  # 0: a CPU partition
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            fail(f"must be a {'whole number >= 0' if least == 0 else 'positive whole number'} (got {value!r})")
    elif want is bool:
        if not isinstance(value, bool):
            fail(f"must be true or false (got {value!r})")
    elif want is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            fail(f"must be a list of shell lines (got {value!r})")
        value = tuple(value)
    elif not isinstance(value, str) or not value.strip() or "\n" in value:
        fail(f"must be a one-line string (got {value!r})")
    if key == "time" and not _SLURM_TIME.fullmatch(value):
        fail(f"{value!r} is not a SLURM time limit like 24:00:00 or 1-12:00:00")
    if key == "bucket" and not value.startswith("gs://"):
        fail(f"{value!r} is not a Cloud Storage URL like gs://BUCKET/attnlab")
    if key == "mem" and not re.fullmatch(r"\d+[KMGT]?", value):
        fail(f"{value!r} is not a SLURM memory size like 200G or 0 (all of the node's memory)")
    return value


def load_sweep(path: str | Path) -> Sweep:
    """Read, validate and expand a sweep spec. Raises ConfigError (one line, naming the file and the key)."""
    spec = _Spec(path)
    data = spec.read()
    name = spec.string(data, "name", label=True)
    description = data.get("description") or ""
    if not isinstance(description, str):
        spec.fail("description", f"must be a string (got {description!r})")
    group = spec.string(data, "group", name)
    out_dir = spec.string(data, "out_dir", DEFAULT_OUT_DIR)
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                            and s >= 0 for s in seeds):
        spec.fail("seeds", f"must be a non-empty list of seeds, whole numbers >= 0 (got {seeds!r})")
    if len(set(seeds)) != len(seeds):
        spec.fail("seeds", f"{seeds!r} lists a seed twice")
    common = spec.overrides(data.get("common"), "common")
    configs = spec.labels(data, "configs", required=True)
    axis = spec.labels(data, "overrides", required=False)
    variants = _variants(spec, configs, axis)
    baseline = data.get("baseline", variants[0].label)
    # With an overrides axis the baseline may be a config label: each variant is then paired with that config's
    # variant of the same override (kda-p8 with softmax-p8).
    choices = {v.label for v in variants} | (set(configs) if axis else set())
    if baseline not in choices:
        spec.fail("baseline", _not_a_variant(baseline, sorted(choices), [v.label for v in variants]))
    metric = data.get("metric", "eval_loss")
    if metric not in METRICS:
        spec.fail("metric", f"{metric!r} is not one of {', '.join(METRICS)}")
    evals = _evals(spec, data.get("evals"), variants, common)
    contrasts = _contrasts(spec, data.get("contrasts"), [v.label for v in variants] + [e.label for e in evals])
    tune = _tune(spec, data.get("tune"), seeds, variants)
    cluster = _cluster(spec, data.get("cluster"))
    _check_loads(spec, variants, common, configs, axis)
    if tune is None:
        runs = _runs(spec.fail, variants, seeds, common, out_dir, name, group)
    else:
        trials = [dataclasses.replace(v, label=f"{v.label}-{tune.tag(x)}", overrides=v.overrides + _set(tune, x))
                  for v in variants for x in tune.values]
        runs = _runs(spec.fail, trials, [tune.seed], common, out_dir, name, group, stage="tune")
    return Sweep(spec.path, name, description.strip(), group, baseline, tuple(seeds), out_dir, common,
                 tuple(variants), tuple(runs), cluster, tuple(configs), tuple(axis), metric, contrasts, tune,
                 common_overrides=common, evals=tuple(evals))


def _evals(spec: _Spec, value: Any, variants: list[Variant], common: tuple[str, ...]) -> list[EvalVariant]:
    """`evals: {label: {of, set, cache_policy, cache_budget, cache_window}}`."""
    from attention.cache_policies import POLICIES

    by = {v.label: v for v in variants}
    out = []
    for label, raw in spec.mapping(value, "evals").items():
        key = f"evals.{label}"
        if not isinstance(label, str) or not _LABEL.fullmatch(label):
            spec.fail(key, "a label may only contain letters, digits and _.+-")
        if label in by:
            spec.fail(key, f"{label!r} is also a variant of the sweep; rename one")
        raw = spec.mapping(raw, key)
        for k in raw:
            if k not in EVAL_KEYS:
                near = difflib.get_close_matches(str(k), EVAL_KEYS, n=1, cutoff=0.5)
                spec.fail(f"{key}.{k}", f"unknown key ({f'did you mean {near[0]}?' if near else 'valid: ' + ', '.join(EVAL_KEYS)})")
        of = raw.get("of")
        if of not in by:
            spec.fail(f"{key}.of", _not_a_variant(of, sorted(by), list(by)))
        policy = raw.get("cache_policy")
        if policy is not None and policy not in POLICIES:
            spec.fail(f"{key}.cache_policy", f"{policy!r} is not one of {', '.join(POLICIES)}")
        for k in ("cache_budget", "cache_window"):
            n = raw.get(k)
            if n is not None and (policy is None or isinstance(n, bool) or not isinstance(n, int) or n < 1):
                spec.fail(f"{key}.{k}", "a positive whole number, and only with cache_policy" if policy else
                          "applies with cache_policy")
        overrides = spec.overrides(raw.get("set"), f"{key}.set")
        try:
            load_config(by[of].config, list(common + by[of].overrides + overrides))
        except ConfigError as e:
            spec.fail(f"{key}.set", _first_line_errors(e))
        out.append(EvalVariant(label, of, overrides, policy, raw.get("cache_budget"), raw.get("cache_window")))
    return out


def _set(tune: Tune, value: Any) -> tuple[str]:
    return (f"{tune.key}={format_value(value)}",)


def _tune(spec: _Spec, value: Any, seeds: list[int], variants: list[Variant]) -> Tune | None:
    """`tune: {key, values, seed, extend}`: a dotted config key, two or more distinct values, a seed (default: the
    first of `seeds`), how many values to try beyond each end (default 0; numeric increasing values above 0)."""
    if value is None:
        return None
    raw = spec.mapping(value, "tune")
    for k in raw:
        if k not in TUNE_KEYS:
            near = difflib.get_close_matches(str(k), TUNE_KEYS, n=1, cutoff=0.5)
            spec.fail(f"tune.{k}", f"unknown key ({f'did you mean {near[0]}?' if near else 'valid: ' + ', '.join(TUNE_KEYS)})")
    key = raw.get("key")
    if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
        spec.fail("tune.key", f"must be a dotted config key like optim.lr (got {key!r})")
    values = raw.get("values")
    if not isinstance(values, list) or len(values) < 2 or any(isinstance(x, (dict, list)) or x is None
                                                              for x in values):
        spec.fail("tune.values", f"must be a list of two or more values to try (got {values!r})")
    if len({format_value(x) for x in values}) != len(values):
        spec.fail("tune.values", f"{values!r} lists a value twice")
    seed = raw.get("seed", seeds[0])
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        spec.fail("tune.seed", f"must be a whole number >= 0 (got {seed!r})")
    extend = raw.get("extend", 0)
    if not isinstance(extend, int) or isinstance(extend, bool) or extend < 0:
        spec.fail("tune.extend", f"must be a whole number >= 0 of values to try beyond each end (got {extend!r})")
    if extend and not (all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in values)
                       and all(a < b for a, b in zip(values, values[1:]))):
        spec.fail("tune.extend", f"needs increasing numbers above 0 in tune.values, to step past their ends at their "
                                 f"own ratio (got {values!r})")
    tune = Tune(key, tuple(values), seed, extend)
    labels = {v.label for v in variants}
    for v in variants:
        if v.init_from is not None:
            spec.fail(f"configs.{v.config_label}.init_from", "a tuned sweep cannot start runs from other runs "
                                                             "(init_from); give those a sweep of their own")
        for x in values:
            label = f"{v.label}-{tune.tag(x)}"
            if not _LABEL.fullmatch(label):
                spec.fail("tune.values", f"{x!r} makes the run label {label!r}, which may only contain letters, "
                                         f"digits and _.+-")
            if label in labels:
                spec.fail("tune", f"the tuning variant {label!r} is also a variant of the sweep; rename one")
    return tune


def with_choices(sweep: Sweep, choices: dict[str, Any]) -> Sweep:
    """`sweep` with the runs of every variant in `choices` (variant -> the chosen value of `sweep.tune.key`) after
    its tuning runs: every seed at that value, the tune seed's run being the tuning run itself."""
    tune = sweep.tune
    if tune is None:
        return sweep
    known = {v.label: choices[v.label] for v in sweep.variants if v.label in choices}
    for label, value in known.items():
        if format_value(value) not in {format_value(x) for x in sweep.tried(label)}:
            raise ConfigError(f"{sweep.path}: tune: {value!r} chosen for {label} is not one of the values it tried "
                              f"(tune.values, and any beyond them by tune.extend)")
    trials = {r.name: r for r in sweep.runs if r.stage == "tune"}

    def fail(key: str, msg: str):
        raise ConfigError(f"{sweep.path}: {key}: {msg}")

    main: list[Run] = []
    for seed in sweep.seeds:
        for v in sweep.variants:
            if v.label not in known:
                continue
            value = known[v.label]
            if seed == tune.seed:
                trial = trials[f"{v.label}-{tune.tag(value)}-s{seed}"]
                main.append(dataclasses.replace(trial, name=f"{v.label}-s{seed}", variant=v.label, stage="main",
                                                reuses=trial.name))
                continue
            main += _runs(fail, [dataclasses.replace(v, overrides=v.overrides + _set(tune, value))], [seed],
                          sweep.common_overrides, sweep.out_dir, sweep.name, sweep.group)
    return dataclasses.replace(sweep, runs=tuple(trials.values()) + tuple(main), choices=known)


def with_extensions(sweep: Sweep, extensions: dict[str, tuple[Any, ...]]) -> Sweep:
    """`sweep` (as loaded, no choices yet) with the tuning runs of the values each variant tries beyond the grid
    (`extensions`: variant -> values, tune.extend)."""
    if not extensions:
        return sweep

    def fail(key: str, msg: str):
        raise ConfigError(f"{sweep.path}: {key}: {msg}")

    tune, by_label = sweep.tune, {v.label: v for v in sweep.variants}
    trials = [dataclasses.replace(by_label[label], label=f"{label}-{tune.tag(x)}",
                                  overrides=by_label[label].overrides + _set(tune, x))
              for label, values in extensions.items() for x in values]
    runs = _runs(fail, trials, [tune.seed], sweep.common_overrides, sweep.out_dir, sweep.name, sweep.group,
                 stage="tune")
    return dataclasses.replace(sweep, runs=sweep.runs + tuple(runs), extensions=dict(extensions))


def _not_a_variant(label: Any, choices: list[str], variants: list[str]) -> str:
    """'x' is not a variant of this sweep (did you mean y? / the variants), for a one-line error."""
    near = difflib.get_close_matches(str(label), choices, n=1, cutoff=0.5)
    return f"{label!r} is not a variant of this sweep" + (f" (did you mean {near[0]}?)" if near
                                                            else f" (variants: {', '.join(variants)})")


def _contrasts(spec: _Spec, value: Any, labels: list[str]) -> tuple[tuple[str, str], ...]:
    """`contrasts: [[variant, reference], ...]`: pairs of two different variants of this sweep."""
    if value is None:
        return ()
    if not isinstance(value, list):
        spec.fail("contrasts", f"must be a list of [variant, reference] pairs (got {value!r})")
    out = []
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            spec.fail("contrasts", f"{pair!r} is not a [variant, reference] pair of variant labels")
        for label in pair:
            if label not in labels:
                spec.fail("contrasts", _not_a_variant(label, labels, labels))
        if pair[0] == pair[1]:
            spec.fail("contrasts", f"{pair!r} compares a variant with itself")
        out.append((pair[0], pair[1]))
    return tuple(out)


def _runs(fail, variants: list[Variant], seeds: list[int], common: tuple[str, ...], out_dir: str,
          name: str, group: str, stage: str = "main") -> list[Run]:
    """Seed by seed, every variant (so the first seed's comparison is complete first); each config loaded.
    `fail(key, msg)` raises the one-line error."""
    sweep_dir = f"{out_dir.rstrip('/')}/{name}"
    runs = []
    for seed in seeds:
        for v in variants:
            run_name = f"{v.label}-s{seed}"
            overrides = (*common, *v.overrides, f"run.name={run_name}", f"run.out_dir={format_value(sweep_dir)}",
                         f"run.seed={seed}", f"wandb.group={format_value(group)}")
            try:
                cfg = load_config(v.config, list(overrides))
            except ConfigError as e:
                fail(f"run {run_name}", _first_line_errors(e))
            source = f"{v.init_from}-s{seed}" if v.init_from else None
            runs.append(Run(run_name, v.label, seed, v.config, overrides, f"{sweep_dir}/{run_name}",
                            f"{sweep_dir}/{source}" if source else None, source, cfg, stage))
    return runs


__all__ = ["Sweep", "Run", "Variant", "Tune", "EvalVariant", "load_sweep", "with_choices", "with_extensions",
           "format_value", "display_path", "CLUSTER_KEYS",
           "check_cluster_value"]
