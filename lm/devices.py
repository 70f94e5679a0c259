"""The devices jax sees, said in one line, and `run.platform`: a run meant for an accelerator refuses to start on
a machine (or in a virtual environment) where jax does not see one, instead of training on the CPU.

jax falls back to its CPU backend without an error when no accelerator plugin is installed or the plugin finds no
device, so the platform a run got must be checked, not assumed.
"""
from __future__ import annotations

import importlib.metadata

import jax

from lm.config import ConfigError

# What `make install DEVICE=...` (the pyproject extra of that name) installs for a platform, and the distribution
# that provides jax's plugin for it.
EXTRA = {"gpu": "cuda12", "tpu": "tpu"}
PLUGIN = {"gpu": "jax-cuda12-plugin", "tpu": "libtpu"}


def platform() -> str:
    """The platform of jax's default devices: cpu, gpu or tpu."""
    return jax.devices()[0].platform


def describe() -> str:
    """'jax 0.11.2 sees 8 gpu device(s) (NVIDIA H100 80GB HBM3) over 2 process(es); this is process 0'."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    where = (f" over {jax.process_count()} processes, this one is process {jax.process_index()}"
             if jax.process_count() > 1 else "")
    return f"jax {jax.__version__} sees {len(devices)} {devices[0].platform} device(s) ({', '.join(kinds)}){where}"


def installed_plugins() -> list[str]:
    """The accelerator plugins installed beside jax, as 'name version'."""
    out = []
    for dist in PLUGIN.values():
        try:
            out.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def check_platform(want: str) -> None:
    """ConfigError when `run.platform` (`want`: auto, cpu, gpu or tpu) is not the platform of jax's devices."""
    got = platform()
    if want == "auto" or got == want:
        return
    plugins = installed_plugins()
    if want == "cpu":
        fix = "set JAX_PLATFORMS=cpu to keep jax off the accelerator"
    elif not any(p.startswith(PLUGIN[want] + " ") for p in plugins):
        fix = (f"jax's {want} plugin is not installed here: `make install DEVICE={EXTRA[want]}` "
               f"(or pip install 'attnlab[{EXTRA[want]}]')")
    else:
        fix = (f"{PLUGIN[want]} is installed but found no {want}: check that this machine has one and that the job "
               f"was given it")
    raise ConfigError(f"run.platform={want} but jax sees {got} devices only ({', '.join(plugins) or 'no accelerator '
                      f'plugin installed'}); {fix}, or set run.platform=auto to train on what jax finds")


__all__ = ["EXTRA", "PLUGIN", "platform", "describe", "installed_plugins", "check_platform"]
