#!/usr/bin/env bash
# Every run of sweep projection_sharing_1.2b (experiments/sweeps/projection_sharing_1.2b.yaml).
# Written by `attnlab sweep --emit`; edit the spec and run it again rather than editing this file:
#   attnlab sweep experiments/sweeps/projection_sharing_1.2b.yaml --emit tpu-vm --out experiments/sweeps/emitted/projection_sharing_1.2b/tpu-vm
# TPU VM attnlab-v5p-32 in us-east5-a (v5p-32, 4 workers), the repository at ~/attnlab on every
# worker; the runs live in gs://BUCKET/attnlab.
# Starts the queue (queue.sh) on every worker, detached: it runs every run in order and goes on when this
# machine goes away. Run setup.sh first. The manifest goes where the runs are, unless one is there already.
set -euo pipefail
cd "$(dirname "$0")"
problems=0
gcloud storage ls gs://BUCKET/attnlab/stores/slimpajama-gpt2/meta.json >/dev/null 2>&1 || { echo "error: token store gs://BUCKET/attnlab/stores/slimpajama-gpt2 (data.source of 15 run(s)) is not there: run setup.sh first" >&2; problems=1; }
[ "$problems" = 0 ] || { echo "nothing submitted" >&2; exit 2; }
gcloud storage ls gs://BUCKET/attnlab/runs/sweeps/projection_sharing_1.2b/sweep.json >/dev/null 2>&1 || gcloud storage cp sweep.json gs://BUCKET/attnlab/runs/sweeps/projection_sharing_1.2b/sweep.json
gcloud compute tpus tpu-vm scp queue.sh attnlab-v5p-32:attnlab-queue-projection_sharing_1.2b.sh --worker=all --zone=us-east5-a
gcloud compute tpus tpu-vm ssh attnlab-v5p-32 --worker=all --zone=us-east5-a \
  --command 'nohup bash attnlab-queue-projection_sharing_1.2b.sh > attnlab-queue-projection_sharing_1.2b.log 2>&1 < /dev/null &'
echo "the queue runs on every worker; follow it with: gcloud compute tpus tpu-vm ssh attnlab-v5p-32 --worker=0 --zone=us-east5-a --command 'tail -f attnlab-queue-projection_sharing_1.2b.log'"
