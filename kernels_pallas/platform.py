"""Where a Pallas kernel runs and how it is compiled there: one kernel body, three targets.

- `cpu`: generic interpret mode (`interpret=True`), what the test suite runs;
- `gpu`: Triton (`pl.pallas_call` with Triton compiler parameters);
- `tpu`: Mosaic.

The *target* is the platform a kernel is being built for. It is the default backend, except inside
`targeting(platform)`, which lets a CPU machine trace and lower kernels for a TPU or a GPU (`lower`), so a
kernel that breaks TPU's (8, 128) block rule or Triton's power-of-two shapes fails on the CPU machine, not on
a cluster. Kernel entry points take `interpret: bool | None` (None: interpret exactly when the target is the
CPU) and pass `compiler_params(gpu=..., tpu=...)`, which keeps only the target's parameters: Triton
parameters refused by a TPU lowering and the reverse are never both in one call. Block sizes come from one
table per target (`for_target`).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Mapping, TypeVar

import jax
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

TARGETS = ("cpu", "gpu", "tpu")
# Backend and lowering-platform names for the same target.
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}
# What `lower` builds for when no device of the platform is attached: the chips the project targets.
LOWERING_DEVICES = {
    "tpu": AbstractDevice(device_kind="TPU v5p", num_cores=1, platform="tpu"),
    "gpu": AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu"),
}
_LOWERING_PLATFORMS = {"tpu": "tpu", "gpu": "cuda"}

_target: contextvars.ContextVar[str | None] = contextvars.ContextVar("pallas_target", default=None)
T = TypeVar("T")


def normalize(platform: str) -> str:
    """'cuda' and 'rocm' -> 'gpu'; raises ValueError naming the known targets for anything else unknown."""
    name = _ALIASES.get(platform, platform)
    if name not in TARGETS:
        raise ValueError(f"unknown Pallas target {platform!r}; use one of {', '.join(TARGETS)} (or cuda)")
    return name


def target() -> str:
    """The platform kernels are built for now: `targeting`'s, else the default backend's."""
    return _target.get() or normalize(jax.default_backend())


@contextlib.contextmanager
def targeting(platform: str) -> Iterator[str]:
    """Build kernels for `platform` inside the block (tracing for a lowering on another machine)."""
    token = _target.set(normalize(platform))
    try:
        yield _target.get()
    finally:
        _target.reset(token)


def resolve_interpret(interpret: bool | None) -> bool:
    """A kernel's `interpret` argument: None means interpret exactly when the target is the CPU."""
    return target() == "cpu" if interpret is None else bool(interpret)


def compiler_params(*, gpu: Mapping[str, Any] | None = None, tpu: Mapping[str, Any] | None = None):
    """The target's compiler parameters (Triton's for gpu, Mosaic's for tpu; None on the CPU, where kernels
    are interpreted and take none)."""
    t = target()
    if t == "gpu":
        return pltriton.CompilerParams(**(gpu or {}))
    if t == "tpu":
        return pltpu.CompilerParams(**(tpu or {}))
    return None


def for_target(table: Mapping[str, T]) -> T:
    """The entry of a per-target table (block sizes, warps) for the current target."""
    t = target()
    if t not in table:
        raise KeyError(f"no entry for target {t!r} in {dict(table)}")
    return table[t]


@contextlib.contextmanager
def _building_for(name: str) -> Iterator[None]:
    """Target `name` and its chip description (an abstract single-device mesh). Auto axes, as a plain
    single-device jit has: under Explicit axes every aval carries a sharding, and the Triton lowering of
    multi-axis reductions in jax 0.11.2 then fails on a spec of the wrong rank."""
    if name == "cpu":
        raise ValueError("lowering is for tpu or gpu; on the CPU kernels run in interpret mode")
    mesh = AbstractMesh((1,), ("lowering",), axis_types=(AxisType.Auto,), abstract_device=LOWERING_DEVICES[name])
    with targeting(name), use_abstract_mesh(mesh):
        yield


def trace(fn: Callable[..., Any], *args: Any, platform: str, **kwargs: Any) -> jax.stages.Traced:
    """Trace `fn(*args, **kwargs)` for `platform` ('tpu' or 'gpu'/'cuda') on any machine: block sizes, plans and
    compiler parameters are the target's. The traced program (`.jaxpr`) holds each kernel's pallas_call."""
    name = normalize(platform)

    # A fresh function each time: jit's trace cache is keyed on the function and the abstract mesh, not on the
    # target, so a kernel traced for one target would otherwise be reused for another.
    def traced(*a, **k):
        return fn(*a, **k)

    with _building_for(name):
        return jax.jit(traced, static_argnames=tuple(kwargs)).trace(*args, **kwargs)


def lower(fn: Callable[..., Any], *args: Any, platform: str, **kwargs: Any) -> jax.stages.Lowered:
    """Trace `fn(*args, **kwargs)` for `platform` ('tpu' or 'gpu'/'cuda') and lower it, on any machine.

    The real Pallas -> Mosaic or Pallas -> Triton lowering runs (block-shape rules, unsupported primitives),
    against `LOWERING_DEVICES`' chip description. What it cannot check: on-chip memory capacity and the
    final compile by libtpu or ptxas.
    """
    name = normalize(platform)
    traced = trace(fn, *args, platform=name, **kwargs)
    with _building_for(name):
        return traced.lower(lowering_platforms=(_LOWERING_PLATFORMS[name],))
