"""Typed, validated run configuration.

A config file is YAML. `base: other.yaml` inherits (paths relative to the file); `--set a.b=value`
overrides from the command line (the value is parsed as YAML). Every section is a pydantic model with
`extra="forbid"`; problems are reported as `ConfigError` with one line per problem naming the file
that set the key, the dotted key, and for unknown keys the nearest valid one.
"""
from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Any, Literal, Optional, get_args

import pydantic
import yaml
from pydantic import Field

from attention import MIXERS
from attention.base import MixerConfig, MixerContext


class ConfigError(ValueError):
    """A config problem the user must fix; the message is ready to print."""


class _Section(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    platform: Literal["auto", "cpu", "gpu", "tpu"] = "auto"  # gpu/tpu: refuse to train on anything else


class TrainConfig(_Section):
    steps: int = Field(1000, ge=1)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)
    eval_steps: int = Field(20, ge=1)
    ckpt_every: int = Field(0, ge=0)
    ckpt_keep: int = Field(3, ge=1)
    async_checkpoint: bool = False  # write checkpoints in the background; steps wait only for the copy to host
    grad_accum: int = Field(1, ge=1)
    max_rejected: int = Field(5, ge=1)
    skip_grad_norm: Optional[float] = Field(None, gt=0)
    retry_rejected: bool = False  # a rejected step is tried again on the next batch: the step does not advance
    diverge_ratio: float = Field(3.0, ge=0)
    diverge_margin: float = Field(1.0, ge=0)  # nats: a diverged loss is also this far above the running mean


class DataConfig(_Section):
    source: str = "stdlib"
    task: dict[str, Any] = Field(default_factory=dict)  # settings of a synthetic:<task> source
    tokenizer: str = "byte"
    seq_len: int = Field(256, ge=2)
    batch_size: int = Field(16, ge=1)
    packed: bool = False
    dir: str = "data"
    val_fraction: float = Field(0.02, gt=0, lt=1)
    rows: Literal["windows", "documents"] = "windows"
    pad_id: Optional[int] = Field(None, ge=0)
    score_padding: bool = True
    score_last: bool = True  # false: a row's last input position has no target (seq_len - 1 scored per row)


class OptimConfig(_Section):
    lr: float = Field(3e-4, gt=0)
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    decay_fraction: float = Field(0.2, gt=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    wd_mask: Literal["matrices", "all"] = "matrices"  # all: also norms, biases, embeddings (GPT-2 recipe runs)
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    clip: Optional[float] = Field(1.0, gt=0)


class MlpConfig(_Section):
    kind: Literal["swiglu", "gelu", "gelu_tanh", "identity"] = "swiglu"  # identity: no MLP (Zoology)
    hidden: int = Field(1024, ge=1)


class ModelConfig(_Section):
    d_model: int = Field(256, ge=1)
    n_layers: int = Field(4, ge=1)
    vocab_size: int = Field(256, ge=2)
    pattern: list[str] = Field(default_factory=lambda: ["softmax"], min_length=1)
    # SerializeAsAny: dump each mixer with its own fields, not just the base class's `kind`.
    mixers: dict[str, pydantic.SerializeAsAny[MixerConfig]] = Field(default_factory=dict)
    mlp: MlpConfig = Field(default_factory=MlpConfig)
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = Field(1e-5, gt=0)
    pos: Literal["rope", "learned", "none"] = "rope"
    rope_theta: float = Field(10000.0, gt=0)
    max_seq_len: int = Field(2048, ge=1)
    tie_embeddings: bool = False
    bias: bool = False
    init_std: float = Field(0.02, gt=0)
    depth_scaled_init: bool = True  # residual-branch output projections get init_std / sqrt(2 * n_layers)
    dropout: float = Field(0.0, ge=0, lt=1)  # residual dropout on each block's mixer and MLP outputs
    embed_dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the embeddings (0 in the projection-sharing paper)
    dtype: Literal["float32", "bfloat16"] = "float32"
    residual_dtype: Literal["compute", "float32"] = "compute"  # float32: the residual stream as under autocast
    remat: Literal["none", "block", "mixer"] = "none"
    # What a rematerialised region keeps from its forward pass (lm/model.py REMAT_POLICIES).
    remat_policy: Literal["nothing", "dots", "dots_no_batch", "mixer_out"] = "nothing"

    @pydantic.field_validator("mixers", mode="before")
    @classmethod
    def _typed_mixers(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        out = {}
        for name, raw in value.items():
            if isinstance(raw, MixerConfig):
                out[name] = raw
                continue
            raw = dict(raw or {})
            kind = raw.setdefault("kind", name)
            if kind not in MIXERS:
                raise ValueError(f"mixer {name!r} has unknown kind {kind!r}; known kinds: {', '.join(sorted(MIXERS))}")
            try:
                out[name] = MIXERS[kind].config.model_validate(raw)
            except pydantic.ValidationError as e:
                # Re-raised with the mixer's name in each location, so errors read model.mixers.<name>.<key>.
                raise pydantic.ValidationError.from_exception_data(
                    e.title, [{"type": err["type"], "loc": (name, *err["loc"]), "input": err["input"],
                               **({"ctx": err["ctx"]} if "ctx" in err else {})} for err in e.errors()]) from None
        return out

    def mixer_for_layer(self, layer_idx: int) -> tuple[str, MixerConfig]:
        name = self.pattern[layer_idx % len(self.pattern)]
        return name, self.mixers[name]


class MeshConfig(_Section):
    data: int = Field(-1, description="-1: all devices not used by fsdp and tensor")
    fsdp: int = Field(1, ge=1)
    tensor: int = Field(1, ge=1)


class KernelsConfig(_Section):
    impl: Literal["auto", "xla", "reference", "pallas"] = "auto"


class WandbConfig(_Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "attnlab"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = Field(default_factory=list)


class HardwareConfig(_Section):
    peak_tflops: Optional[float] = Field(None, gt=0, description="per-device peak for MFU; None: table or CPU probe")


class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    kernels: KernelsConfig = Field(default_factory=KernelsConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    hardware: HardwareConfig = Field(default_factory=HardwareConfig)

    def mixer_context(self, layer_idx: int) -> MixerContext:
        import jax.numpy as jnp

        m = self.model
        return MixerContext(
            d_model=m.d_model,
            n_layers=m.n_layers,
            layer_idx=layer_idx,
            seq_len=self.data.seq_len,
            pos=m.pos,
            rope_theta=m.rope_theta,
            bias=m.bias,
            norm_eps=m.norm_eps,
            init_std=m.init_std,
            out_std=m.init_std / math.sqrt(2 * m.n_layers) if m.depth_scaled_init else m.init_std,
            dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32,
            impl=self.kernels.impl,
            train_steps=self.train.steps,
        )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------
# Loading: YAML with base inheritance and dotted overrides, tracking which file set each key.


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-3 as a float (YAML 1.1 wants a dot in the mantissa)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = parse_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (run, train, data, ...)")
    return data


def _merge(dst: dict, src: dict, origins: dict, origin: str, prefix: str = "") -> None:
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, origins, origin, dotted + ".")
        else:
            dst[key] = value
            origins[dotted] = origin


def _load_file(path: Path, origins: dict, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: `base:` chain loops back to itself ({' -> '.join(p.name for p in chain + (path,))})")
    data = _read_yaml(path)
    base = data.pop("base", None)
    merged: dict[str, Any] = {}
    if base is not None:
        bases = base if isinstance(base, list) else [base]
        for b in bases:
            if not isinstance(b, str):
                raise ConfigError(f"{path}: `base:` must be a path or a list of paths, got {b!r}")
            bpath = (path.parent / b) if not Path(b).is_absolute() else Path(b)
            if not bpath.exists():
                raise ConfigError(f"{path}: base file {b!r} not found (looked at {bpath})")
            _merge(merged, _load_file(bpath, origins, chain + (path,)), {}, "")
    _merge(merged, data, origins, str(_display(path)))
    return merged


def _display(path: Path) -> Path:
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def apply_override(raw: dict, origins: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected key=value, e.g. --set optim.lr=1e-3")
    key, text = override.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"--set {override!r}: {key!r} is not a dotted key like optim.lr")
    try:
        value = parse_yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {p!r} is a value, not a section")
        node = child
    node[parts[-1]] = value
    origins[key] = "--set"


def _origin(origins: dict, dotted: str) -> str:
    probe = dotted
    while probe:
        if probe in origins:
            return origins[probe]
        probe = probe.rpartition(".")[0]
    return "defaults"


def _check_keys(raw: Any, cls: type[pydantic.BaseModel], prefix: str, origins: dict, errors: list[str]) -> None:
    """Unknown keys, with the nearest valid key, before pydantic sees the data."""
    if not isinstance(raw, dict):
        return
    fields = cls.model_fields
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f" (did you mean {prefix}{near[0]}?)" if near else f" (valid keys: {', '.join(fields)})"
            errors.append(f"{_origin(origins, dotted)}: unknown key {dotted}{hint}")
            continue
        ann = fields[key].annotation
        # An optional section (Optional[Section]) is checked like a section.
        ann = next((a for a in get_args(ann) if isinstance(a, type) and issubclass(a, pydantic.BaseModel)), ann)
        if isinstance(ann, type) and issubclass(ann, pydantic.BaseModel):
            _check_keys(value, ann, dotted + ".", origins, errors)
        elif cls is ModelConfig and key == "mixers" and isinstance(value, dict):
            for name, mraw in value.items():
                if not isinstance(mraw, dict):
                    continue
                kind = mraw.get("kind", name)
                if kind in MIXERS:
                    _check_keys(mraw, MIXERS[kind].config, f"{dotted}.{name}.", origins, errors)


def _format_pydantic(e: pydantic.ValidationError, origins: dict) -> list[str]:
    out = []
    for err in e.errors():
        dotted = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = err["msg"]
        if err["type"] not in ("value_error", "assertion_error"):
            msg = f"{msg} (got {err.get('input')!r})"
        else:
            msg = msg.removeprefix("Value error, ")
        out.append(f"{_origin(origins, dotted)}: {dotted}: {msg}")
    return out


def cross_checks(cfg: Config) -> list[str]:
    """Problems between fields, as `key: message`, found before anything is compiled."""
    errs: list[str] = []
    m, d, t = cfg.model, cfg.data, cfg.train
    for name in m.pattern:
        if name not in m.mixers:
            near = difflib.get_close_matches(name, list(m.mixers), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (defined: {', '.join(m.mixers) or 'none'})"
            errs.append(f"model.pattern: mixer {name!r} is not defined under model.mixers{hint}")
    if len(m.pattern) > m.n_layers:
        errs.append(f"model.pattern: {len(m.pattern)} entries but model.n_layers is {m.n_layers}")
    if not errs:
        for name in dict.fromkeys(m.pattern):
            layers = [i for i in range(m.n_layers) if m.pattern[i % len(m.pattern)] == name]
            if layers:
                for msg in m.mixers[name].check(cfg.mixer_context(layers[0])):
                    errs.append(f"model.mixers.{name}.{msg}")
    if m.pos == "learned" and d.seq_len > m.max_seq_len:
        errs.append(f"data.seq_len: {d.seq_len} exceeds model.max_seq_len {m.max_seq_len} (learned positions)")
    if d.rows == "documents" and d.pad_id is None:
        errs.append("data.pad_id: data.rows=documents pads each document to data.seq_len + 1; give the pad (EOS) "
                    "token's id, e.g. 50256 for GPT-2")
    if not d.score_last and d.source.startswith("synthetic:"):
        errs.append("data.score_last: a synthetic task chooses which targets it scores; leave score_last true")
    if d.pad_id is not None and d.pad_id >= m.vocab_size:
        errs.append(f"data.pad_id: {d.pad_id} is outside model.vocab_size {m.vocab_size}")
    if d.batch_size % t.grad_accum:
        errs.append(f"train.grad_accum: {t.grad_accum} does not divide data.batch_size {d.batch_size}")
    if cfg.optim.warmup_steps > t.steps:
        errs.append(f"optim.warmup_steps: {cfg.optim.warmup_steps} is larger than train.steps {t.steps}; lower it "
                    f"too, e.g. --set optim.warmup_steps={t.steps // 10}")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", cfg.run.name):
        errs.append(f"run.name: {cfg.run.name!r} may only contain letters, digits and _.+-")
    if cfg.mesh.data == 0 or cfg.mesh.data < -1:
        errs.append(f"mesh.data: must be a positive number of devices or -1 (all remaining), got {cfg.mesh.data}")
    return errs


def load_config(path: str | Path | None, overrides: list[str] = (), *, raw: dict | None = None) -> Config:
    """Load, merge, override and validate. Raises ConfigError listing every problem found."""
    origins: dict[str, str] = {}
    data: dict[str, Any] = {}
    if path is not None:
        data = _load_file(Path(path), origins)
    if raw is not None:
        _merge(data, raw, origins, "<dict>")
    for o in overrides:
        apply_override(data, origins, o)
    errors: list[str] = []
    _check_keys(data, Config, "", origins, errors)
    if errors:
        raise ConfigError("\n".join(errors))
    try:
        cfg = Config.model_validate(data)
    except pydantic.ValidationError as e:
        raise ConfigError("\n".join(_format_pydantic(e, origins))) from None
    errors = cross_checks(cfg)
    if errors:
        raise ConfigError("\n".join(f"{_origin(origins, e.split(':', 1)[0])}: {e}" for e in errors))
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def resolved_mesh(cfg: Config, n_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes for `n_devices`; raises ConfigError when they cannot multiply out."""
    f, t = cfg.mesh.fsdp, cfg.mesh.tensor
    if n_devices % (f * t):
        raise ConfigError(f"mesh: fsdp*tensor = {f * t} does not divide the {n_devices} available devices")
    d = n_devices // (f * t) if cfg.mesh.data == -1 else cfg.mesh.data
    if d * f * t != n_devices:
        raise ConfigError(f"mesh: data*fsdp*tensor = {d}*{f}*{t} = {d * f * t} but {n_devices} devices are available")
    if cfg.data.batch_size % (d * f * cfg.train.grad_accum):
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} is not divisible by data*fsdp*grad_accum = "
            f"{d}*{f}*{cfg.train.grad_accum}"
        )
    return d, f, t


def n_params_str(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.{3 if n < 10 * div else 1}f}{unit}"
    return str(int(n))


__all__ = ["Config", "ConfigError", "load_config", "dump_config", "resolved_mesh", "parse_yaml"]
