#!/usr/bin/env bash
# The GPU check, in one run of at most ~8 minutes:
#   1. kernel and op parity on the GPU: every Pallas kernel compiled by Triton against the reference ops
#      (fp32 at highest matmul precision), and the softmax-family mixers on impl=pallas;
#   2. softmax attention forward+backward (bf16, causal and windowed, GQA 16/4 and MHA, head dim 128 and 64,
#      T = 1k..32k) with TFLOP/s: our xla, pallas, cudnn and auto against jax's cuDNN and tokamax (when installed),
#      and SP-KV at 10% kept against cuDNN's dense attention (experiments/bench/flash_gpu.py); kda and lightning
#      (B=1, H=16, D=128, T = 2k..32k), xla against pallas;
#   3. decode: step time and achieved HBM bandwidth on the bytes read, dense against SP-KV's pruned cache at
#      density 0.1 (window 64), K,V and K=V+rope, S = 8k..64k, xla against pallas;
#   4. flash-linear-attention's chunk_kda and chunk_simple_gla (PyTorch, Triton) at the linear ops' shapes;
#   5. train-step tokens/s and MFU of the ~300M config, impl=xla against impl=pallas (bf16).
# Usage: bash experiments/bench/gpu_suite.sh OUT_DIR   (writes 8 files: the device tool returns at most 8)
# Python packages the GPU image lacks (grain, pydantic, ...) travel as cp312 wheels in .whl/: run
# experiments/bench/gpu_wheels.sh on the CPU machine first and carry .whl with the run.
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
} > "$OUT/suite.log" 2>&1
cat "$OUT/suite.log"

log "1/5 kernel and op parity on GPU"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 110 python3 -m pytest -q -p no:cacheprovider tests/kernels \
  tests/attention/test_softmax_op.py tests/attention/test_mixers_pallas.py --durations=5 > "$OUT/parity.txt" 2>&1
echo "exit $?" >> "$OUT/parity.txt"; tail -5 "$OUT/parity.txt"

log "2/5 softmax attention fwd+bwd: ours (xla, pallas, cudnn, auto) against cuDNN and tokamax; SP-KV at 10% kept"
# SP-KV and T=8192 first: what the targets name; the budget cuts the rest of the grid (listed as not run).
timeout 110 python3 -m experiments.bench.flash_gpu --T 8192 32768 1024 --D 128 64 --heads 16/4 16/16 \
  --masks causal window:1024 --spkv-density 0.1 --reps 3 --budget-s 90 --json "$OUT/flash.json" \
  >> "$OUT/suite.log" 2>&1
echo "flash exit $?" | tee -a "$OUT/suite.log"
# The linear ops' chunk pipelines (kda, lightning) against their chunked xla ops, at fla's benchmark shapes.
timeout 60 python3 -m lm.bench.ops --ops linear --impl xla pallas --dtype bfloat16 --B 1 --H 16 \
  --D 128 --T 2048 8192 32768 --reps 5 --json "$OUT/ops_linear.json" >> "$OUT/suite.log" 2>&1
echo "ops linear exit $?" | tee -a "$OUT/suite.log"

log "3/5 decode step time and bandwidth, dense and SP-KV (bf16, 32/8 heads, d128)"
timeout 90 python3 -m lm.bench.decode --S 8192 32768 65536 --B 8 --Hq 32 --Hkv 8 --D 128 --impl xla pallas \
  --kv K,V K=V+rope --spkv-density 0.1 --reps 10 --json "$OUT/decode.json" >> "$OUT/suite.log" 2>&1
echo "decode exit $?" | tee -a "$OUT/suite.log"

log "4/5 flash-linear-attention's kda and simple_gla kernels (same shapes as ops_linear)"
timeout 45 python3 experiments/bench/fla_linear_gpu.py --T 2048 8192 32768 --B 1 --H 16 --D 128 \
  --json "$OUT/fla_linear.json" >> "$OUT/suite.log" 2>&1
echo "fla exit $?" | tee -a "$OUT/suite.log"

log "5/5 train steps, ~300M config"
for IMPL in xla pallas; do
  timeout 60 python3 -m lm.cli bench step configs/bench/gpu_300m.yaml --steps 10 --json \
    --set kernels.impl=$IMPL > "$OUT/step_300m_$IMPL.json" 2>> "$OUT/suite.log"
  echo "step $IMPL exit $?" | tee -a "$OUT/suite.log"
done
tail -c 600 "$OUT"/step_*.json
log "done"
