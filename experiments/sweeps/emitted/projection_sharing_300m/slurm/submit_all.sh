#!/usr/bin/env bash
# Every run of sweep projection_sharing_300m (experiments/sweeps/projection_sharing_300m.yaml).
# Written by `attnlab sweep --emit`; edit the spec and run it again rather than editing this file:
#   attnlab sweep experiments/sweeps/projection_sharing_300m.yaml --emit slurm --out experiments/sweeps/emitted/projection_sharing_300m/slurm
# Submits the sweep from the repository root, after checking that every token store exists and that the
# environment has jax's plugin for the jobs. The runs go in as one array job, at most 4 running at once;
# a run that starts from another run's checkpoint (init_from) as its own job after that run (afterok). A
# job SLURM rejects is named, and the others are still submitted.
set -euo pipefail
cd "$(dirname "$0")/../../../../.."
problems=0
test -f data/slimpajama-gpt2/meta.json || { echo "error: token store data/slimpajama-gpt2 (data.source of 24 run(s)) does not exist: prepare it first (attnlab data prepare --source FILES --tokenizer TOKENIZER --out data/slimpajama-gpt2)" >&2; problems=1; }
( source .venv/bin/activate && python -m lm.devices gpu ) || { problems=1; }
[ "$problems" = 0 ] || { echo "nothing submitted" >&2; exit 2; }
mkdir -p runs/sweeps/projection_sharing_300m && { test -e runs/sweeps/projection_sharing_300m/sweep.json || cp experiments/sweeps/emitted/projection_sharing_300m/slurm/sweep.json runs/sweeps/projection_sharing_300m/sweep.json; }
rejected=()
array=
if array=$(sbatch --parsable --array=0-23%4 experiments/sweeps/emitted/projection_sharing_300m/slurm/array.sbatch); then
  array=${array%%;*}; echo "array job $array, task i runs the i-th of: qkv-s42 gqa4-s42 mqa-s42 share_kv-s42 share_kv_gqa4-s42 share_qk-s42 share_kv_mqa-s42 share_qkv-s42 qkv-s43 gqa4-s43 mqa-s43 share_kv-s43 share_kv_gqa4-s43 share_qk-s43 share_kv_mqa-s43 share_qkv-s43 qkv-s44 gqa4-s44 mqa-s44 share_kv-s44 share_kv_gqa4-s44 share_qk-s44 share_kv_mqa-s44 share_qkv-s44"
else array=; rejected+=(qkv-s42 gqa4-s42 mqa-s42 share_kv-s42 share_kv_gqa4-s42 share_qk-s42 share_kv_mqa-s42 share_qkv-s42 qkv-s43 gqa4-s43 mqa-s43 share_kv-s43 share_kv_gqa4-s43 share_qk-s43 share_kv_mqa-s43 share_qkv-s43 qkv-s44 gqa4-s44 mqa-s44 share_kv-s44 share_kv_gqa4-s44 share_qk-s44 share_kv_mqa-s44 share_qkv-s44); fi
if [ "${#rejected[@]}" -gt 0 ]; then
  echo "error: not submitted: ${rejected[*]} (SLURM's message is above, or the run they start from was not submitted); submit each with sbatch experiments/sweeps/emitted/projection_sharing_300m/slurm/RUN.sbatch once fixed" >&2
  exit 1
fi
