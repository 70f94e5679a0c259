"""The devices jax sees, said in one line, and `run.platform`: a run meant for an accelerator refuses to start on
a machine (or in a virtual environment) where jax does not see one, instead of training on the CPU.

jax falls back to its CPU backend without an error when no accelerator plugin is installed or the plugin finds no
device, so the platform a run got must be checked, not assumed.

`python -m lm.devices gpu|tpu` is the launch scripts' check of an environment before jobs are submitted from a
machine that has no accelerator itself (a login node): it needs jax's plugin for the platform installed, and
imports neither jax nor the plugin.
"""
from __future__ import annotations

import importlib.metadata
import sys

# What `make install DEVICE=...` (the pyproject extra of that name) installs for a platform, and the distribution
# that provides jax's plugin for it.
EXTRA = {"gpu": "cuda12", "tpu": "tpu"}
PLUGIN = {"gpu": "jax-cuda12-plugin", "tpu": "libtpu"}


def platform() -> str:
    """The platform of jax's default devices: cpu, gpu or tpu."""
    import jax

    return jax.devices()[0].platform


def describe() -> str:
    """'jax 0.11.2 sees 8 gpu device(s) (NVIDIA H100 80GB HBM3)', and over how many processes."""
    import jax

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


def missing_plugin(want: str) -> str | None:
    """What to do when jax's plugin for `want` (gpu or tpu) is not installed here, else None."""
    if want not in PLUGIN or any(p.startswith(PLUGIN[want] + " ") for p in installed_plugins()):
        return None
    return (f"jax's {want} plugin ({PLUGIN[want]}) is not installed here: `make install DEVICE={EXTRA[want]}` (or "
            f"pip install 'attnlab[{EXTRA[want]}]')")


def check_platform(want: str) -> None:
    """ConfigError when `run.platform` (`want`: auto, cpu, gpu or tpu) is not the platform of jax's devices."""
    from lm.config import ConfigError

    got = platform()
    if want == "auto" or got == want:
        return
    if want == "cpu":
        fix = "set JAX_PLATFORMS=cpu to keep jax off the accelerator"
    else:
        fix = missing_plugin(want) or (f"{PLUGIN[want]} is installed but found no {want}: check that this machine "
                                       f"has one and that the job was given it")
    raise ConfigError(f"run.platform={want} but jax sees {got} devices only ({', '.join(installed_plugins()) or 'no '
                      f'accelerator plugin installed'}); {fix}, or set run.platform=auto to train on what jax finds")


def main(argv: list[str]) -> int:
    """`python -m lm.devices gpu|tpu|cpu`: exit 2 with one line when this environment lacks jax's plugin for it."""
    if len(argv) != 1 or argv[0] not in ("cpu", *PLUGIN):
        print(f"usage: python -m lm.devices cpu|{'|'.join(PLUGIN)}", file=sys.stderr)
        return 2
    problem = missing_plugin(argv[0])
    if problem:
        print(f"error: {problem}; the jobs would train on the CPU", file=sys.stderr)
        return 2
    print(f"{argv[0]}: {', '.join(installed_plugins()) or 'no accelerator plugin needed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
