#!/usr/bin/env bash
# Run share_kv_gqa4-s42 of sweep projection_sharing_300m (experiments/sweeps/projection_sharing_300m.yaml).
# Written by `attnlab sweep --emit`; edit the spec and run it again rather than editing this file:
#   attnlab sweep experiments/sweeps/projection_sharing_300m.yaml --emit tpu-vm --out experiments/sweeps/emitted/projection_sharing_300m/tpu-vm
# TPU VM attnlab-v5p-16 in us-east5-a (v5p-16, 2 workers), the repository at ~/attnlab on every
# worker. Every worker runs the same command and they join one run (TPU_WORKER_HOSTNAMES); the run
# directory must be on a filesystem all workers share (edit out_dir in the spec). A run stopped early
# saved a checkpoint: running this script again resumes it.
set -euo pipefail
gcloud compute tpus tpu-vm ssh attnlab-v5p-16 --zone=us-east5-a --worker=all \
  --command 'cd attnlab && source .venv/bin/activate && attnlab train configs/paper_qkv/300m/share_kv_gqa4.yaml --set model.remat=block --set run.name=share_kv_gqa4-s42 --set run.out_dir=runs/sweeps/projection_sharing_300m --set run.seed=42 --set wandb.group=projection-sharing-300m --set run.platform=tpu'
