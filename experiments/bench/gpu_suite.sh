#!/usr/bin/env bash
# The GPU check, in one run of at most ~8 minutes:
#   1. op parity tests (reference vs xla vs pallas, fp32 at highest matmul precision) on the GPU;
#   2. forward+backward timings of our ops against cuDNN / XLA attention (bf16);
#   3. train-step tokens/s and MFU of the CPU bench config and of a ~300M config (bf16, XLA path).
# Usage: bash experiments/bench/gpu_suite.sh OUT_DIR   (writes 7 files: the device tool returns at most 8)
# Python packages the GPU image lacks (grain, pydantic, ...) may be carried as cp312 wheels in .whl/.
set -uo pipefail
OUT=${1:?usage: gpu_suite.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda ATTNLAB_COMPILE_CACHE=/tmp/attnlab-xla-cache
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/suite.log"; }
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import jax, flax, optax, sys; print("python", sys.version.split()[0], "jax", jax.__version__,
              "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

log "1/3 op parity on GPU"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 200 python3 -m pytest -q -p no:cacheprovider tests/attention tests/kernels \
  -x --durations=5 > "$OUT/parity.txt" 2>&1
echo "exit $?" >> "$OUT/parity.txt"; tail -5 "$OUT/parity.txt"

log "2/3 op timings (bf16, fwd+bwd)"
timeout 120 python3 -m lm.bench.ops --dtype bfloat16 --B 4 --H 16 --D 64 --T 1024 4096 16384 \
  --reps 5 --json "$OUT/ops.json" > "$OUT/ops.txt" 2>&1
echo "exit $?" >> "$OUT/ops.txt"; tail -3 "$OUT/ops.txt"

log "3/3 train steps"
timeout 90 python3 -m lm.cli bench step configs/bench/cpu_d512_l8.yaml --steps 10 --json \
  --set model.dtype=bfloat16 > "$OUT/step_d512_bf16.json" 2>> "$OUT/suite.log"
timeout 150 python3 -m lm.cli bench step configs/bench/gpu_300m.yaml --steps 10 --json \
  > "$OUT/step_300m.json" 2>> "$OUT/suite.log"
tail -c 600 "$OUT"/step_*.json
log "done"
