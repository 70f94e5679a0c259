#!/usr/bin/env bash
# Every run of sweep projection_sharing_300m (experiments/sweeps/projection_sharing_300m.yaml).
# Written by `attnlab sweep --emit`; edit the spec and run it again rather than editing this file:
#   attnlab sweep experiments/sweeps/projection_sharing_300m.yaml --emit tpu-vm --out experiments/sweeps/emitted/projection_sharing_300m/tpu-vm
# Runs every run, one after another, on the TPU VM (run from anywhere; the commands run on the workers).
# The manifest goes where the runs are, unless one is there already.
set -euo pipefail
cd "$(dirname "$0")"
gcloud compute tpus tpu-vm ssh attnlab-v5p-16 --zone=us-east5-a --worker=0 --command 'mkdir -p attnlab/runs/sweeps/projection_sharing_300m && test -e attnlab/runs/sweeps/projection_sharing_300m/sweep.json' || gcloud compute tpus tpu-vm scp sweep.json attnlab-v5p-16:attnlab/runs/sweeps/projection_sharing_300m/sweep.json --zone=us-east5-a --worker=0
bash qkv-s42.sh
bash gqa4-s42.sh
bash mqa-s42.sh
bash share_kv-s42.sh
bash share_kv_gqa4-s42.sh
bash share_qk-s42.sh
bash share_kv_mqa-s42.sh
bash share_qkv-s42.sh
bash qkv-s43.sh
bash gqa4-s43.sh
bash mqa-s43.sh
bash share_kv-s43.sh
bash share_kv_gqa4-s43.sh
bash share_qk-s43.sh
bash share_kv_mqa-s43.sh
bash share_qkv-s43.sh
bash qkv-s44.sh
bash gqa4-s44.sh
bash mqa-s44.sh
bash share_kv-s44.sh
bash share_kv_gqa4-s44.sh
bash share_qk-s44.sh
bash share_kv_mqa-s44.sh
bash share_qkv-s44.sh
