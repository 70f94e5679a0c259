#!/usr/bin/env bash
# Every run of sweep projection_sharing_1.2b (experiments/sweeps/projection_sharing_1.2b.yaml).
# Written by `attnlab sweep --emit`; edit the spec and run it again rather than editing this file:
#   attnlab sweep experiments/sweeps/projection_sharing_1.2b.yaml --emit slurm --out experiments/sweeps/emitted/projection_sharing_1.2b/slurm
# Submits the sweep from the repository root, after checking that every token store exists and that the
# environment has jax's plugin for the jobs. The runs go in as one array job, at most 2 running at once;
# a run that starts from another run's checkpoint (init_from) as its own job after that run (afterok). A
# job SLURM rejects is named, and the others are still submitted.
set -euo pipefail
cd "$(dirname "$0")/../../../../.."
problems=0
test -f data/slimpajama-gpt2/meta.json || { echo "error: token store data/slimpajama-gpt2 (data.source of 15 run(s)) does not exist: prepare it first (attnlab data prepare --source FILES --tokenizer TOKENIZER --out data/slimpajama-gpt2)" >&2; problems=1; }
( source .venv/bin/activate && python -m lm.devices gpu ) || { problems=1; }
[ "$problems" = 0 ] || { echo "nothing submitted" >&2; exit 2; }
mkdir -p runs/sweeps/projection_sharing_1.2b && { test -e runs/sweeps/projection_sharing_1.2b/sweep.json || cp experiments/sweeps/emitted/projection_sharing_1.2b/slurm/sweep.json runs/sweeps/projection_sharing_1.2b/sweep.json; }
rejected=()
array=
if array=$(sbatch --parsable --array=0-14%2 experiments/sweeps/emitted/projection_sharing_1.2b/slurm/array.sbatch); then
  array=${array%%;*}; echo "array job $array, task i runs the i-th of: qkv-s42 share_kv-s42 gqa8-s42 share_kv_gqa8-s42 share_kv_mqa-s42 qkv-s43 share_kv-s43 gqa8-s43 share_kv_gqa8-s43 share_kv_mqa-s43 qkv-s44 share_kv-s44 gqa8-s44 share_kv_gqa8-s44 share_kv_mqa-s44"
else array=; rejected+=(qkv-s42 share_kv-s42 gqa8-s42 share_kv_gqa8-s42 share_kv_mqa-s42 qkv-s43 share_kv-s43 gqa8-s43 share_kv_gqa8-s43 share_kv_mqa-s43 qkv-s44 share_kv-s44 gqa8-s44 share_kv_gqa8-s44 share_kv_mqa-s44); fi
if [ "${#rejected[@]}" -gt 0 ]; then
  echo "error: not submitted: ${rejected[*]} (SLURM's message is above, or the run they start from was not submitted); submit each with sbatch experiments/sweeps/emitted/projection_sharing_1.2b/slurm/RUN.sbatch once fixed" >&2
  exit 1
fi
