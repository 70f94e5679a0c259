"""lm.runtime.keep_host_memory: a program's temporaries are reused from one call to the next instead of being
mapped and page-faulted in anew (the CPU train step's ~2 GB of temporaries cost ~490,000 faults a step)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROGRAM = textwrap.dedent("""
    import resource, sys
    from lm.runtime import keep_host_memory
    kept = keep_host_memory()
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.exp(x * 2.0) @ x[:8].T)  # exp(2x) is a 64 MB temporary
    x = jnp.ones((2048, 8192))
    faults = []
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(kept, min(faults[-4:]))  # glibc's heap settles after a few calls; then nothing is faulted in
""")


def _run(env_value: str) -> tuple[bool, int]:
    env = {**os.environ, "ATTNLAB_HOST_MALLOC": env_value, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="keep_host_memory sets glibc's mallopt, which only Linux has")
def test_temporaries_are_reused_instead_of_faulted_in_every_call():
    kept, faults = _run("")
    assert kept
    # 64 MB is ~16,000 pages: with the heap kept, a call touches only pages it already has.
    assert faults < 2_000, f"{faults} minor page faults in a call with the heap kept"
    kept, faults = _run("system")
    assert not kept
    assert faults > 10_000, f"glibc's defaults fault the temporaries in again ({faults}): the check above could not fail"


LARGE_BLOCK = textwrap.dedent("""
    import ctypes, resource
    from lm.runtime import keep_host_memory
    assert keep_host_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    n = 2_200_000_000  # past 2 GiB, the most an int trim threshold could keep
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(*faults)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="keep_host_memory sets glibc's mallopt, which only Linux has")
def test_a_block_past_2_gib_is_kept_too():
    """The first use faults the block in (537,000 pages); once freed it stays, however large the free heap top."""
    out = subprocess.run([sys.executable, "-c", LARGE_BLOCK], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2], env={**os.environ, "ATTNLAB_HOST_MALLOC": ""})
    first, *again = map(int, out.stdout.split())
    assert first > 500_000 and max(again) < 1_000, (first, again)
