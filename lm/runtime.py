"""Process-wide settings the command line applies once at start: the compile cache, the host heap."""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import jax


def enable_compile_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Persist compiled executables so a resumed or repeated run skips recompilation.

    The directory comes from `path`, else $ATTNLAB_COMPILE_CACHE, else ~/.cache/attnlab/xla;
    ATTNLAB_COMPILE_CACHE=off disables it. Entries are keyed by the program, jax version and flags.
    """
    where = path or os.environ.get("ATTNLAB_COMPILE_CACHE") or Path.home() / ".cache" / "attnlab" / "xla"
    if str(where).lower() == "off":
        return None
    where = Path(where)
    where.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return where


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_host_memory_kept = False


def host_memory_kept() -> bool:
    """Whether keep_host_memory applied in this process."""
    return _host_memory_kept


def keep_host_memory() -> bool:
    """Serve host allocations from one heap that keeps what is freed, so that a step reuses the previous
    step's memory instead of mapping and page-faulting it in anew. Returns whether it applied.

    XLA:CPU allocates an execution's temporaries as one block (the cpu_d512_l8 train step: 1.97 GB).
    glibc maps every block over 32 MiB with mmap and unmaps it on free, so each step faulted all those
    pages in again: about 490,000 minor faults and 1 CPU-second of kernel time per step on 2 cores.
    One arena (XLA's runtime threads allocate too), no mmap and no trimming keep the block for the next
    step. The process holds on to its peak host memory in exchange. Trimming is off altogether (-1), not just
    above a threshold: mallopt's threshold is an int, and a free top of the heap past 2 GiB (the step's block and
    whatever was freed next to it) was trimmed after every step in some runs and not in others.

    Call it before the first JAX computation, whose runtime threads must find the setting in place.
    ATTNLAB_HOST_MALLOC=system keeps glibc's defaults; without glibc's mallopt (macOS, musl) nothing changes.
    """
    if os.environ.get("ATTNLAB_HOST_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    global _host_memory_kept
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: never trim (mallopt(3))
    _host_memory_kept = all([mallopt(param, value) == 1 for param, value in settings])
    return _host_memory_kept
