"""Implementation dispatch for attention ops: reference / xla / pallas / cudnn / splash / auto, with no silent
fallback.

Every op registers its implementations here. `resolve` picks one:

- an explicit impl must exist and, for a kernel (pallas, or the library kernels cudnn and splash), its
  `supports(...)` check must pass; otherwise `ImplUnavailable` is raised with the reason;
- "auto" asks the op's chooser (`register_auto`) where it has one; otherwise it takes pallas when a kernel is
  registered and supports the call on a GPU or TPU, else xla. It records the choice and the reason so the run
  can log it (see `choices()`). On the CPU auto never takes a kernel: kernels run there only interpreted (what
  the tests check), far slower than xla.

Choices are recorded at trace time (ops are called inside jit), keyed by op and a caller label.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable

import jax

# Why auto takes xla on the CPU (one wording for every op).
CPU_INTERPRETED = "on the CPU Pallas kernels run only interpreted (for tests); xla is faster"
IMPLS = ("reference", "xla", "pallas", "cudnn", "splash", "auto")
# Implementations that run a kernel and say which calls they serve (`supports`): ours, and the library kernels.
KERNEL_IMPLS = ("pallas", "cudnn", "splash")


class ImplUnavailable(RuntimeError):
    """An explicitly requested implementation cannot run this call."""


@dataclasses.dataclass(frozen=True)
class Choice:
    op: str
    requested: str
    chosen: str
    reason: str


_impls: dict[str, dict[str, Callable[..., Any]]] = {}
# (op, kernel impl) -> function(**call_info) -> None when the kernel supports the call, else a reason string.
_supports: dict[tuple[str, str], Callable[..., str | None]] = {}
# op -> function(backend=, why_not={kernel impl: None or reason}, **call_info) -> (impl, reason) for auto.
_auto: dict[str, Callable[..., tuple[str, str]]] = {}
_choices: dict[tuple[str, str], Choice] = {}
_lock = threading.Lock()
_label = threading.local()


def register(op: str, impl: str, *, supports: Callable[..., str | None] | None = None):
    """Decorator: register `fn` as implementation `impl` of `op`. A kernel's `supports(**call_info)` says which
    calls it serves."""
    if impl not in ("reference", "xla") + KERNEL_IMPLS:
        raise ValueError(f"cannot register impl {impl!r}; use reference, xla, {', '.join(KERNEL_IMPLS)}")

    def deco(fn):
        _impls.setdefault(op, {})[impl] = fn
        if impl in KERNEL_IMPLS:
            _supports[(op, impl)] = supports or (lambda **_: None)
        return fn

    return deco


def register_auto(op: str, choose: Callable[..., tuple[str, str]]) -> None:
    """Let `choose(backend=..., why_not={impl: None or the reason it cannot run}, **call_info)` pick auto's
    implementation of `op` and say why."""
    _auto[op] = choose


KERNEL_DTYPES = ("float32", "bfloat16", "float16")


def float_inputs(kernel: str) -> Callable[..., str | None]:
    """A `supports` check for a kernel that takes float32, bfloat16 or float16 inputs."""

    def supports(*, dtype, **_):
        name = jax.numpy.dtype(dtype).name
        if name in KERNEL_DTYPES:
            return None
        return f"the {kernel} kernel takes {', '.join(KERNEL_DTYPES)} inputs, not {name}"

    return supports


def ops() -> list[str]:
    """Every op with a registered implementation."""
    return sorted(_impls)


def implementations(op: str) -> dict[str, Callable[..., Any]]:
    """The registered implementations of `op` by name (reference, xla and, where a kernel exists, pallas)."""
    return dict(_impls.get(op, {}))


def backend() -> str:
    return jax.default_backend()


def _kernel_reason(op: str, impl: str, call_info: dict[str, Any]) -> str | None:
    """None when kernel implementation `impl` of `op` can run this call, else why not."""
    if impl not in _impls.get(op, {}):
        return f"no {impl} kernel is registered for {op}"
    return _supports[(op, impl)](backend=backend(), **call_info)


def why_not(op: str, impl: str, **call_info: Any) -> str | None:
    """None when implementation `impl` of `op` can run this call, else why not (reference and xla run all)."""
    if impl not in _impls.get(op, {}):
        return f"{impl} is not implemented for {op}"
    return _kernel_reason(op, impl, call_info) if impl in KERNEL_IMPLS else None


def resolve(op: str, impl: str, **call_info: Any) -> Callable[..., Any]:
    """Return the implementation of `op` to run for `impl`, recording the choice."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r} is not one of {', '.join(IMPLS)}")
    table = _impls.get(op)
    if not table:
        raise ImplUnavailable(f"op {op!r} has no registered implementation")
    if impl == "auto" and op in _auto:
        why_not = {k: _kernel_reason(op, k, call_info) for k in KERNEL_IMPLS if k in table}
        chosen, reason = _auto[op](backend=backend(), why_not=why_not, **call_info)
    elif impl == "auto":
        why_not = _kernel_reason(op, "pallas", call_info)
        if why_not is None and backend() == "cpu":
            why_not = CPU_INTERPRETED

        chosen = "pallas" if why_not is None else "xla"
        reason = "pallas kernel supports this call" if why_not is None else why_not
    else:
        if impl in KERNEL_IMPLS and impl in table:
            why_not = _kernel_reason(op, impl, call_info)
            if why_not is not None:
                raise ImplUnavailable(f"{op}: impl={impl!r} cannot run here: {why_not}")
        elif impl not in table:
            raise ImplUnavailable(f"{op}: impl={impl!r} is not implemented")
        chosen, reason = impl, "requested"
        if impl == "pallas" and backend() == "cpu":
            reason += "; on the CPU the kernels run interpreted, far slower than xla (what the tests check)"
    label = getattr(_label, "value", "")
    with _lock:
        _choices[(op, label)] = Choice(op, impl, chosen, reason)
    return table[chosen]


class label_calls:
    """Context manager: ops resolved inside are recorded under `label` (e.g. 'layer3.softmax')."""

    def __init__(self, label: str):
        self.label = label

    def __enter__(self):
        self.prev = getattr(_label, "value", "")
        _label.value = self.label
        return self

    def __exit__(self, *exc):
        _label.value = self.prev
        return False


def choices() -> list[tuple[str, Choice]]:
    """All recorded choices as (label, Choice), in label order."""
    with _lock:
        return sorted(((k[1], v) for k, v in _choices.items()), key=lambda kv: (kv[0], kv[1].op))


def clear_choices() -> None:
    with _lock:
        _choices.clear()
