"""Process-wide JAX settings the command line applies once at start."""
from __future__ import annotations

import os
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
