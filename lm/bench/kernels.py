"""The structure of each Pallas kernel, read from its traced program on any machine (`attnlab kernels lower --report`).

A kernel is judged by its structure before any timing, and all of it is visible in the program that `pallas_call`
holds once traced for a target (`platform.targeting`), with no device:

- the grid and its number of programs (against the chip's cores: 132 SMs on an H100/H200);
- every `dot_general` of the kernel body with its operand dtypes and accumulator type, counted once each and as
  FLOPs per program (trip counts of the loops around it multiplied in): the share on bf16 operands with fp32
  accumulation is the share that runs on tensor cores / the MXU at full rate;
- the loops of the body and their trip counts (a loop over a chunk's rows is visible as a trip count of C);
- TPU VMEM per grid step: the VMEM blocks of the kernel's signature, each padded to whole (sublane, 128-lane)
  tiles, inputs and outputs times their buffer count (2: double buffering), plus scratch. This is what Mosaic
  allocates; lowering does not check it against the chip, libtpu's compile does.
- GPU registers, spills and shared memory per kernel for sm_90a, where the `triton` package (which ships ptxas) is
  installed: the Triton module jax emits is compiled by it (a newer Triton than jax's own, so indicative).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import subprocess
import tempfile
from typing import Any, Iterator

import jax.numpy as jnp
from jax.extend import core as jcore

from kernels_pallas import platform

MiB = 1 << 20
# VMEM per TensorCore (jax/_src/tpu_info.py): what a kernel's blocks and scratch must fit in.
TPU_VMEM_BYTES = {"v5e": 128 * MiB, "v5p": 64 * MiB, "v6e": 128 * MiB, "v7x": 64 * MiB}
# The project's bound: every kernel at T=32768 fits the smallest chip with room for the compiler's own buffers.
VMEM_BOUND_BYTES = 16 * MiB
_LANES = 128


@dataclasses.dataclass
class Dot:
    lhs: str
    rhs: str
    acc: str
    flops: int            # per program, loop trips multiplied in

    @property
    def fast(self) -> bool:
        """bf16 (or narrower) operands accumulated in fp32: tensor cores / the MXU at full rate."""
        return self.lhs == self.rhs and self.lhs in ("bfloat16", "float16", "float8_e4m3fn", "float8_e5m2") \
            and self.acc == "float32"


@dataclasses.dataclass
class KernelStructure:
    name: str
    grid: tuple[int, ...]          # -1: a traced bound (SP-KV's compact axes follow the gate)
    dots: list[Dot]
    loops: list[int]               # trip count of every loop in the body (-1: not static)
    vmem_bytes: int                # TPU only: per grid step, tile-padded, blocks x buffers + scratch
    vmem_blocks: list[str]         # one 'shape dtype xN' per VMEM buffer, for reading the figure
    vmem_limit_bytes: int | None = None   # TPU: the scoped limit the kernel declares (None: the compiler's default)
    ptxas: dict[str, int] | None = None

    @property
    def programs(self) -> int:
        """-1 when a grid dim is traced."""
        return -1 if min(self.grid) < 0 else math.prod(self.grid)

    @property
    def fast_dots(self) -> int:
        return sum(d.fast for d in self.dots)

    @property
    def flops(self) -> int:
        return sum(d.flops for d in self.dots)

    @property
    def fast_flop_share(self) -> float:
        return sum(d.flops for d in self.dots if d.fast) / max(1, self.flops)

    def as_dict(self) -> dict[str, Any]:
        return dict(name=self.name, grid=list(self.grid), programs=self.programs, dots=len(self.dots),
                    dots_bf16_fp32acc=self.fast_dots, dot_flops_per_program=self.flops,
                    bf16_flop_share=round(self.fast_flop_share, 4), loops=self.loops,
                    vmem_bytes=self.vmem_bytes, vmem_blocks=self.vmem_blocks, vmem_limit_bytes=self.vmem_limit_bytes,
                    ptxas=self.ptxas)


def _sub_jaxprs(params: dict[str, Any]) -> Iterator[jcore.Jaxpr]:
    for p in params.values():
        for sub in p if isinstance(p, (tuple, list)) else (p,):
            if isinstance(sub, jcore.ClosedJaxpr):
                yield sub.jaxpr
            elif isinstance(sub, jcore.Jaxpr):
                yield sub


def _pallas_calls(jaxpr: jcore.Jaxpr) -> Iterator[jcore.JaxprEqn]:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        else:
            for sub in _sub_jaxprs(eqn.params):
                yield from _pallas_calls(sub)


def _dot_flops(eqn: jcore.JaxprEqn) -> int:
    """2 x batch x M x N x K of a dot_general."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    free_r = math.prod(n for a, n in enumerate(rhs) if a not in rc and a not in rb)
    return 2 * math.prod(lhs) * free_r


def _trip_count(eqn: jcore.JaxprEqn) -> int:
    """A scan's length; a while loop's static trip count when it is a counted loop (fori_loop with dynamic
    bounds is not): -1 otherwise."""
    if eqn.primitive.name == "scan":
        return int(eqn.params["length"])
    return -1


def _walk_body(jaxpr: jcore.Jaxpr, trips: int, dots: list[Dot], loops: list[int]) -> None:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = (v.aval.dtype for v in eqn.invars)
            acc = eqn.params.get("preferred_element_type") or eqn.outvars[0].aval.dtype
            dots.append(Dot(jnp.dtype(lhs).name, jnp.dtype(rhs).name, jnp.dtype(acc).name,
                            _dot_flops(eqn) * max(trips, 1)))
        elif name in ("scan", "while"):
            n = _trip_count(eqn)
            loops.append(n)
            for sub in _sub_jaxprs(eqn.params):
                _walk_body(sub, trips * max(n, 1), dots, loops)
        elif name == "cond":
            # Count the costliest branch once.
            best: tuple[list[Dot], list[int]] = ([], [])
            for sub in _sub_jaxprs(eqn.params):
                d, lp = [], []
                _walk_body(sub, trips, d, lp)
                if sum(x.flops for x in d) >= sum(x.flops for x in best[0]):
                    best = (d, lp)
            dots += best[0]
            loops += best[1]
        else:
            for sub in _sub_jaxprs(eqn.params):
                _walk_body(sub, trips, dots, loops)


def _padded_bytes(shape: tuple[int, ...], dtype) -> int:
    """Bytes of a VMEM buffer laid out in (sublane, 128-lane) tiles: 8 sublanes for 32-bit values, 16 for 16-bit,
    32 for 8-bit (the sublane tiling of v5e/v5p/v6e)."""
    itemsize = jnp.dtype(dtype).itemsize
    shape = (1,) * max(0, 2 - len(shape)) + tuple(shape)
    sublanes = 8 * max(1, 4 // itemsize)
    *lead, s, lanes = shape
    return math.prod(lead) * (-(-s // sublanes) * sublanes) * (-(-lanes // _LANES) * _LANES) * itemsize


def _is_vmem(aval) -> bool:
    space = str(getattr(aval, "memory_space", "")).lower()
    return not any(x in space for x in ("any", "hbm", "smem", "semaphore"))


def _vmem(eqn: jcore.JaxprEqn) -> tuple[int, list[str]]:
    gm = eqn.params["grid_mapping"]
    body = eqn.params["jaxpr"]
    refs = body.invars[gm.num_index_operands:]
    n_blocks = gm.num_inputs + gm.num_outputs
    total, parts = 0, []
    for idx, var in enumerate(refs):
        aval = var.aval
        if not _is_vmem(aval) or not hasattr(aval, "shape"):
            continue
        if idx < n_blocks:
            mode = gm.block_mappings[idx].pipeline_mode
            buffers = getattr(mode, "buffer_count", None) or 2
        else:
            buffers = 1
        size = _padded_bytes(tuple(aval.shape), aval.dtype) * buffers
        total += size
        parts.append(f"{'x'.join(map(str, aval.shape))} {jnp.dtype(aval.dtype).name} x{buffers}")
    return total, parts


def kernel_structures(fn, *args, target: str) -> list[KernelStructure]:
    """The structure of every pallas_call in fn(*args) traced for `target` ('tpu' or 'gpu'), in program order.
    VMEM figures are meaningful for 'tpu' only (0 elsewhere)."""
    target = platform.normalize(target)
    out = []
    for eqn in _pallas_calls(platform.trace(fn, *args, platform=target).jaxpr.jaxpr):
        gm = eqn.params["grid_mapping"]
        dots: list[Dot] = []
        loops: list[int] = []
        _walk_body(eqn.params["jaxpr"], 1, dots, loops)
        vmem, parts = _vmem(eqn) if target == "tpu" else (0, [])
        name = eqn.params.get("name") or str(eqn.params["jaxpr"].debug_info.func_name)
        limit = getattr(eqn.params.get("compiler_params"), "vmem_limit_bytes", None) if target == "tpu" else None
        grid = tuple(g if isinstance(g, int) else -1 for g in gm.grid)
        out.append(KernelStructure(name=name, grid=grid, dots=dots, loops=loops, vmem_bytes=vmem, vmem_blocks=parts,
                                   vmem_limit_bytes=limit))
    return out


# ---- GPU: registers and spills from ptxas -------------------------------------------------------------------

def ptxas_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return os.path.exists(_ptxas_path())


def _ptxas_path() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def triton_modules(fn, *args) -> list[tuple[str, str, int, int]]:
    """(name, Triton IR text, num_warps, num_stages) of every Pallas kernel in fn(*args) lowered for the GPU."""
    from jax._src.pallas.triton import pallas_call_registration as reg

    captured: list[tuple[str, str, int, int]] = []
    original = reg.lowering.lower_jaxpr_to_triton_module

    def capture(jaxpr, grid_mapping, *a, **k):
        result = original(jaxpr, grid_mapping, *a, **k)
        captured.append((result.module.operation.get_asm(enable_debug_info=False), *a))
        return result

    reg.lowering.lower_jaxpr_to_triton_module = capture
    try:
        text = platform.lower(fn, *args, platform="gpu").as_text()
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = original
    # The custom calls carry each kernel's name and launch parameters, in the order they were lowered.
    configs = re.findall(r'name = "([^"]+)".*?num_stages = (\d+) : i32, num_warps = (\d+) : i32', text)
    if len(configs) != len(captured):
        configs = [("?", "3", "4")] * len(captured)
    return [(name, ir, int(warps), int(stages))
            for (ir, *_), (name, stages, warps) in zip(captured, configs)]


_PTXAS_RE = {
    "registers": r"Used (\d+) registers",
    "spill_store_bytes": r"(\d+) bytes spill stores",
    "spill_load_bytes": r"(\d+) bytes spill loads",
    "stack_bytes": r"(\d+) bytes stack frame",
    "shared_bytes": r"(\d+) bytes smem",
}


@functools.lru_cache(maxsize=256)
def ptxas_usage(ir: str, num_warps: int, num_stages: int, arch: int = 90) -> dict[str, int]:
    """Registers, spills, stack and static shared memory of one Triton module compiled for sm_{arch}a."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ttir")
        with open(src, "w") as f:
            f.write(ir)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([_ptxas_path(), "-v", f"--gpu-name=sm_{arch}a", ptx, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    usage = {k: int(m.group(1)) if (m := re.search(rx, log)) else 0 for k, rx in _PTXAS_RE.items()}
    usage["shared_bytes"] = max(usage["shared_bytes"], int(compiled.metadata.shared))
    return usage


def report_rows(Ts: tuple[int, ...], *, only: str | None = None, ptxas: bool = False,
                targets: tuple[str, ...] = ("tpu", "gpu")) -> Iterator[dict[str, Any]]:
    """One row per (T, family, target, kernel) over `catalog.report_cases`: the structure above as a dict, with
    `family`, `shape`, `T`, `target`. ptxas=True adds registers/spills for the GPU rows (needs `triton`)."""
    from kernels_pallas import catalog

    for T in Ts:
        for case in catalog.report_cases(T):
            if only is not None and case.kernel != only:
                continue
            for target in targets:
                structures = kernel_structures(case.fn, *case.args, target=target)
                if target == "gpu" and ptxas:
                    for s, (_, ir, warps, stages) in zip(structures, triton_modules(case.fn, *case.args)):
                        s.ptxas = ptxas_usage(ir, warps, stages)
                for s in structures:
                    yield dict(family=case.kernel, shape=case.shape, T=T, target=target, **s.as_dict())


def format_row(row: dict[str, Any]) -> str:
    """One report row on one line: what the kernel runs as, and what it needs of the chip."""
    grid = "x".join("?" if n < 0 else str(n) for n in row["grid"])
    programs = "?" if row["programs"] < 0 else row["programs"]
    loops = ",".join("?" if n < 0 else str(n) for n in row["loops"]) or "-"
    line = (f"{row['target']:<3} T={row['T']:<6} {row['name']:<22} grid {grid:<12} {programs:>6} programs  "
            f"dots {row['dots_bf16_fp32acc']:>2}/{row['dots']:<2} bf16 ({100 * row['bf16_flop_share']:5.1f}% of "
            f"dot FLOPs)  loops {loops:<12}")
    if row["target"] == "tpu":
        mib = row["vmem_bytes"] / MiB
        over = [chip for chip, cap in TPU_VMEM_BYTES.items() if row["vmem_bytes"] > cap]
        fits = f"over {','.join(over)}" if over else ("fits every chip" if row["vmem_bytes"] <= VMEM_BOUND_BYTES
                                                       else "fits, above the 16 MiB bound")
        limit = row.get("vmem_limit_bytes")
        declared = f", limit {limit / MiB:.0f} MiB" if limit else ", no limit set"
        line += f"  VMEM {mib:7.2f} MiB/step ({fits}{declared})"
    if row.get("ptxas"):
        p = row["ptxas"]
        line += (f"  sm_90a: {p['registers']} regs, {p['spill_store_bytes']} B spill stores, "
                 f"{p['shared_bytes'] // 1024} KiB smem")
    return line.rstrip()
