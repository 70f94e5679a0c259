#!/usr/bin/env bash
# Fetch, on this machine, the cp312 wheels the GPU image lacks, into .whl/ (ignored by git), so a device run
# can carry them: `gpu_suite.sh` installs whatever .whl/ holds. The versions are this venv's. The image already
# has jax, flax, optax, orbax, numpy, pyarrow, pyyaml, rich, pytest, hypothesis, pytest-xdist and
# typing-extensions; wandb stays out (metrics go offline, and W&B is imported only when a run enables it).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
pkgs=$("$PY" - <<'PY'
from importlib.metadata import version
names = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "grain", "array-record",
         "portpicker"]
# fla-core: flash-linear-attention's kernels (pure Python; torch and triton are in the image), for the suite's
# comparison with our linear kernels.
print(" ".join([f"{n}=={version(n)}" for n in names] + ["fla-core==0.6.0"]))
PY
)
for pkg in $pkgs; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 -d .whl "$pkg"
done
ls -la .whl
