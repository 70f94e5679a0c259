"""Device mesh and the mapping from logical parameter axes to mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer state
sharded), `tensor` (heads / MLP hidden / vocab split). A logical axis whose size does not divide by
its mesh axes is replicated instead; `replicated_fraction` reports how much of the model that is.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm.config import Config, resolved_mesh

AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "layers": (),
}


def make_mesh(cfg: Config, devices: list | None = None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = resolved_mesh(cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def _spec_for(shape: tuple[int, ...], axes: tuple[str | None, ...], mesh: Mesh) -> P:
    out, used = [], set()
    for dim, name in zip(shape, axes):
        mesh_axes = tuple(a for a in LOGICAL_RULES.get(name, ()) if a not in used and mesh.shape[a] > 1) if name else ()
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if mesh_axes and dim % size == 0:
            used.update(mesh_axes)
            out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            out.append(None)
    return P(*out)


def param_specs(shapes: Any, meta: Any, mesh: Mesh) -> Any:
    """Params-shaped tree of PartitionSpecs from logical axes."""
    return jax.tree.map(lambda s, m: _spec_for(tuple(s.shape), m.axes, mesh), shapes, meta,
                        is_leaf=lambda x: hasattr(x, "axes"))


def named(tree_of_specs: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), tree_of_specs, is_leaf=lambda x: isinstance(x, P))


def batch_spec() -> P:
    return P(("data", "fsdp"))


def replicated_fraction(shapes: Any, specs: Any, mesh: Mesh) -> float:
    """Fraction of parameters held whole on every device although the mesh could split them."""
    if mesh.shape["fsdp"] * mesh.shape["tensor"] == 1:
        return 0.0
    total = rep = 0
    for s, spec in zip(jax.tree.leaves(shapes), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        n = math.prod(s.shape)
        total += n
        if all(a is None for a in spec):
            rep += n
    return rep / max(total, 1)
