"""`attnlab plan CONFIG --mesh data=..,fsdp=..,tensor=..`: compile the train step ahead of time for abstract
shapes (no parameter is materialised) and report what one device holds, from the compiled program.

- parameters and optimizer state: the bytes of each device's shard of every leaf, from its sharding;
- the compiled step's own account (`memory_analysis`): its arguments, outputs and temporaries (activations
  kept for the backward under the config's `model.remat`, and scratch) per device;
- FLOPs: the compiled program's count (`cost_analysis`, per device) against the analytic 3 x forward FLOPs.
  XLA counts a loop's body once, so gradient accumulation's micro-steps and the blocked attention's key loop
  make the compiled count a fraction of the work; the ratio is meaningful only for loop-free programs.
- warnings: a `tensor` axis that does not divide a mixer's head counts (devices would hold parts of heads) or the
  mlp / vocab sizes (replicated instead of split).

On a CPU machine the mesh's devices are simulated host devices (the command sets their number before jax
starts), so the plan for an 8-accelerator mesh compiles here. Sizes come from the compiler for the platform it
compiles for; a CPU compile stands in for an accelerator's and can differ from it in the temporaries (fusion
and layout differ), not in the parameter and optimizer shards.
"""
from __future__ import annotations

import math
import time

# jax is imported inside the functions that need it: the CLI parses --mesh and sets the simulated device count
# before jax starts.
MESH_AXES = ("data", "fsdp", "tensor")


def parse_mesh(text: str | None) -> dict[str, int]:
    """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4}; ValueError naming what is wrong."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--mesh: {part!r} is not AXIS=N with AXIS one of {', '.join(MESH_AXES)} and N >= 1 "
                             f"(e.g. --mesh data=2,fsdp=4)")
        out[name] = int(value)
    return out


def devices_needed(mesh: dict[str, int]) -> int:
    return math.prod(mesh.values()) if mesh else 1


def tensor_warnings(cfg, shapes, meta, tensor: int) -> list[str]:
    """What a tensor axis of size `tensor` cannot split evenly, one sentence each: a head count it does not divide
    (each device would hold part of a head), and parameter dimensions (mlp, vocab) it does not divide, which
    lm.sharding then replicates instead of splitting."""
    import jax

    from lm.sharding import LOGICAL_RULES

    if tensor == 1:
        return []
    out = []
    for name in dict.fromkeys(cfg.model.pattern):
        mixer = cfg.model.mixers[name]
        heads = {"heads": getattr(mixer, "n_heads", None)}
        heads["kv heads"] = getattr(mixer, "n_kv_heads", None) or heads["heads"]
        bad = [f"{n} {kind}" for kind, n in heads.items() if n and n % tensor]
        if bad:
            out.append(f"mesh.tensor={tensor} does not divide the {' and '.join(bad)} of mixer {name}: each device "
                       f"holds part of a head; use a tensor size that divides the head counts")
    unsplit: dict[str, set[int]] = {}
    for shape, m in zip(jax.tree.leaves(shapes), jax.tree.leaves(meta, is_leaf=lambda x: hasattr(x, "axes"))):
        for d, axis in zip(shape.shape, m.axes):
            if axis in ("mlp", "vocab") and "tensor" in LOGICAL_RULES[axis] and d % tensor:
                unsplit.setdefault(axis, set()).add(d)
    if unsplit:
        sizes = ", ".join(f"{axis} {'/'.join(map(str, sorted(v)))}" for axis, v in unsplit.items())
        out.append(f"mesh.tensor={tensor} does not divide {sizes}: those weights are replicated on every tensor "
                   f"device instead of split")
    return out


def _device_bytes(tree, shardings) -> int:
    """Bytes one device holds of every leaf of `tree` (ShapeDtypeStructs) under `shardings`."""
    import jax
    import numpy as np

    total = 0
    for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=lambda x: hasattr(x, "shard_shape"))):
        total += math.prod(sh.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


def plan(config: str, overrides: list[str], mesh: dict[str, int]) -> dict:
    import jax
    import numpy as np

    from lm.config import load_config
    from lm.model import count_params
    from lm.train.setup import build
    from lm.train.step import make_train_step

    sets = [f"mesh.{axis}={mesh.get(axis, 1)}" for axis in MESH_AXES] if mesh else []
    cfg = load_config(config, list(overrides) + sets)
    setup = build(cfg)
    step_fn = make_train_step(cfg, setup.mdef, setup.tx, setup.schedule)
    state = setup.abstract_state()
    B, T = cfg.data.batch_size, cfg.data.seq_len
    batch = {"tokens": jax.ShapeDtypeStruct((B, T + 1), np.int32, sharding=setup.batch_sh)}
    t0 = time.perf_counter()
    compiled = jax.jit(step_fn, in_shardings=(setup.state_sh, setup.batch_sh), out_shardings=(setup.state_sh, None),
                       donate_argnums=(0,)).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    model = setup.mdef.merge(setup.state_shapes["params"])
    analytic = 3 * model.flops_per_token(T) * B * T
    n_dev = setup.mesh.devices.size
    gib = 2 ** 30
    res = {
        "config": config, "overrides": list(overrides), "mesh": dict(setup.mesh.shape), "devices": n_dev,
        "params": count_params(setup.state_shapes["params"]), "batch_size": B, "seq_len": T,
        "remat": cfg.model.remat, "dtype": cfg.model.dtype,
        "param_gib_per_device": _device_bytes(setup.state_shapes["params"], setup.state_sh["params"]) / gib,
        "opt_gib_per_device": _device_bytes(setup.state_shapes["opt"], setup.state_sh["opt"]) / gib,
        "arguments_gib": mem.argument_size_in_bytes / gib, "outputs_gib": mem.output_size_in_bytes / gib,
        "temporaries_gib": mem.temp_size_in_bytes / gib,
        "peak_gib_per_device": (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                                + mem.output_size_in_bytes - mem.alias_size_in_bytes) / gib,
        "compiled_tflops_per_device": cost.get("flops", float("nan")) / 1e12,
        "analytic_tflops_per_device": analytic / n_dev / 1e12,
        "compile_s": compile_s, "platform": jax.default_backend(),
    }
    res["compiled_over_analytic"] = res["compiled_tflops_per_device"] / res["analytic_tflops_per_device"]
    res["warnings"] = tensor_warnings(cfg, setup.state_shapes["params"], setup.mdef.meta(), setup.mesh.shape["tensor"])
    return res


COMPILED_NOTE = ("the compiled FLOPs per device over the analytic 3 x forward count: XLA counts a loop's body once "
                 "(gradient accumulation and the blocked attention's key loop pull it below 1) and replicated work "
                 "on every device (above 1), so it checks FLOPs only for loop-free, evenly sharded programs")


def format_lines(res: dict) -> list[str]:
    """`plan`'s text output: one `key: value` line per result, the ratio with what it means, warnings last."""
    lines = []
    for k, v in res.items():
        if k == "warnings":
            continue
        text = f"{v:.3f}" if isinstance(v, float) else str(v)
        lines.append(f"{k}: {text}" + (f" ({COMPILED_NOTE})" if k == "compiled_over_analytic" else ""))
    return lines + [f"warning: {w}" for w in res.get("warnings", ())]
