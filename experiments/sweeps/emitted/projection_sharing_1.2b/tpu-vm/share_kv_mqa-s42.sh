#!/usr/bin/env bash
# Run share_kv_mqa-s42 of sweep projection_sharing_1.2b (experiments/sweeps/projection_sharing_1.2b.yaml).
# Written by `attnlab sweep --emit`; edit the spec and run it again rather than editing this file:
#   attnlab sweep experiments/sweeps/projection_sharing_1.2b.yaml --emit tpu-vm --out experiments/sweeps/emitted/projection_sharing_1.2b/tpu-vm
# TPU VM attnlab-v5p-32 in us-east5-a (v5p-32, 4 workers), the repository at ~/attnlab on every
# worker; the runs live in gs://BUCKET/attnlab.
# One run in the foreground, on every worker: they join one run. If the ssh session drops, the run saves and
# stops (SIGHUP); running this script again resumes it. submit_all.sh runs every run detached instead.
set -euo pipefail
gcloud compute tpus tpu-vm ssh attnlab-v5p-32 --worker=all --zone=us-east5-a \
  --command 'cd attnlab && source .venv/bin/activate && attnlab train configs/paper_qkv/1.2b/share_kv_mqa.yaml --set model.remat=block --set run.name=share_kv_mqa-s42 --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_1.2b --set run.seed=42 --set wandb.group=projection-sharing-1.2b --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 --set run.platform=tpu'
