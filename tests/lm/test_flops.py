"""The CPU peak behind MFU is measured once per machine and read back, so MFU does not move with how busy
the machine was when a run started; the config's hardware.peak_tflops always wins."""
from __future__ import annotations

import json

import jax.numpy as jnp

from lm import flops


def test_cpu_peak_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE_DIR", str(tmp_path))
    probes = []
    monkeypatch.setattr(flops, "matmul_probe", lambda **kw: probes.append(kw) or 1.5e11)
    first, how = flops.peak_flops(None, jnp.float32)
    assert first == 1.5e11 and "measured now" in how and len(probes) == 1
    monkeypatch.setattr(flops, "matmul_probe", lambda **kw: probes.append(kw) or 9e99)
    again, how = flops.peak_flops(None, jnp.float32)
    assert again == 1.5e11 and "cached in" in how and str(tmp_path) in how and len(probes) == 1
    assert list(json.loads((tmp_path / "peak_flops.json").read_text()).values())[0]["flops"] == 1.5e11
    # Another dtype is another entry; a damaged cache file is measured again, not an error.
    flops.peak_flops(None, jnp.bfloat16)
    assert len(probes) == 2
    (tmp_path / "peak_flops.json").write_text("{not json")
    assert flops.peak_flops(None, jnp.float32)[0] == 9e99


def test_config_peak_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE_DIR", str(tmp_path))
    assert flops.peak_flops(0.5, jnp.float32) == (0.5e12, "config hardware.peak_tflops")
    assert not (tmp_path / "peak_flops.json").exists()
