"""Dependencies point one way: kernels_pallas <- attention.ops <- attention <- lm <- experiments.

Every module of the package is parsed (not imported) and each import, at module level or inside a
function, is checked against that order, so a lazy import cannot hide an upward edge.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("kernels_pallas", "attention", "lm", "experiments")
# Layer of a module: the longest matching prefix wins (attention.ops sits below the mixers in attention).
LAYERS = {"kernels_pallas": 0, "attention.ops": 1, "attention": 2, "lm": 3, "experiments": 4}
# What the kernels may import besides the standard library and themselves.
KERNEL_THIRD_PARTY = {"jax", "numpy"}  # numpy: trace-time tables (block kinds), a dependency of jax itself
# Mixer modules: one never imports another (shared pieces live in attention.base / attention.layers /
# attention.spkv).
MIXER_MODULES = {"attention.softmax", "attention.cca", "attention.kda", "attention.lightning"}


def layer_of(module: str) -> int | None:
    best = None
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return None if best is None else best[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file (or in `text`, read as that file)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text() if text is None else text, str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from attention import ops` imports attention.ops: count the deepest name.
            out += [(node.lineno, f"{target}.{a.name}" if layer_of(f"{target}.{a.name}") is not None
                     and f"{target}.{a.name}" in ALL_MODULES else target) for a in node.names]
    return out


SOURCES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
ALL_MODULES = {module_name(p) for p in SOURCES}


def violations(path: Path, text: str | None = None) -> list[str]:
    mod = module_name(path)
    here = layer_of(mod)
    bad = []
    for line, target in imports_of(path, text):
        where = f"{path.relative_to(ROOT)}:{line} imports {target}"
        top = target.split(".")[0]
        there = layer_of(target)
        if there is not None and there > here:
            bad.append(f"{where} (layer {there} above {mod}'s layer {here})")
        if here == 0 and there is None and top not in sys.stdlib_module_names and top not in KERNEL_THIRD_PARTY:
            bad.append(f"{where} (kernels import only jax, numpy and the standard library)")
        if mod in MIXER_MODULES and target in MIXER_MODULES - {mod}:
            bad.append(f"{where} (one mixer imports another)")
    return bad


def test_sources_found():
    assert len(SOURCES) > 40 and {"lm.model", "attention.softmax", "attention.ops"} <= ALL_MODULES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    assert violations(path) == []


def test_the_check_catches_upward_edges():
    """The checker itself: a lazy upward import, a relative one, a mixer importing a mixer, and a kernel
    importing a third-party package other than jax and numpy are all reported."""
    cases = [
        ("attention/kda.py", "def f():\n    from lm import model\n", "imports lm.model (layer 3"),
        ("attention/ops/softmax/xla.py", "from ... import softmax\n", "imports attention.softmax (layer 2"),
        ("attention/cca.py", "from attention import softmax\n", "one mixer imports another"),
        ("lm/cli.py", "from experiments.bench import torch_step\n", "(layer 4"),
        ("kernels_pallas/platform.py", "import triton\n", "kernels import only jax"),
    ]
    for rel, src, expect in cases:
        found = violations(ROOT / rel, src)
        assert any(expect in v for v in found), (rel, found)


def test_training_never_imports_eval_and_eval_never_imports_the_loop():
    """lm.eval builds on lm.train's setup, step and run-directory modules; lm.train does not import lm.eval."""
    bad = []
    for path in SOURCES:
        mod = module_name(path)
        for line, target in imports_of(path):
            where = f"{path.relative_to(ROOT)}:{line} imports {target}"
            in_train = mod == "lm.train" or mod.startswith("lm.train.")
            if in_train and (target == "lm.eval" or target.startswith("lm.eval.")):
                bad.append(where)
            if mod == "lm.eval" and target in ("lm.train", "lm.train.loop"):
                bad.append(where)
    assert bad == []
