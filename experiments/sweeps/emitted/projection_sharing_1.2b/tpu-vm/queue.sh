#!/usr/bin/env bash
# Every run of sweep projection_sharing_1.2b (experiments/sweeps/projection_sharing_1.2b.yaml).
# Written by `attnlab sweep --emit`; edit the spec and run it again rather than editing this file:
#   attnlab sweep experiments/sweeps/projection_sharing_1.2b.yaml --emit tpu-vm --out experiments/sweeps/emitted/projection_sharing_1.2b/tpu-vm
# Runs on every worker of the TPU VM, started detached by submit_all.sh: every run in order. A run that fails
# is named and the queue goes on; at the end it names the runs that failed. Each run's output is in
# ~/attnlab-logs/projection_sharing_1.2b/RUN.log and, after the run, in the bucket's logs/RUN.WORKER.log.
set -uo pipefail
cd attnlab
source .venv/bin/activate
logs=~/attnlab-logs/projection_sharing_1.2b
mkdir -p "$logs"
failed=()
run() {  # NAME COMMAND...
  local name=$1 status=0; shift
  echo "$(date '+%F %T') $name: starting"
  "$@" >> "$logs/$name.log" 2>&1 || status=$?
  if [ "$status" = 0 ]; then echo "$(date '+%F %T') $name: ended"; else
    echo "$(date '+%F %T') $name: failed with exit status $status (its log: $logs/$name.log)"; failed+=("$name"); fi
  gcloud storage cp "$logs/$name.log" gs://BUCKET/attnlab/runs/sweeps/projection_sharing_1.2b/logs/"$name.$(hostname).log" >/dev/null 2>&1 || echo "could not copy $name's log to the bucket"
}
run qkv-s42 attnlab train configs/paper_qkv/1.2b/qkv.yaml \
  --set model.remat=block \
  --set run.name=qkv-s42 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_1.2b \
  --set run.seed=42 \
  --set wandb.group=projection-sharing-1.2b \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_kv-s42 attnlab train configs/paper_qkv/1.2b/share_kv.yaml \
  --set model.remat=block \
  --set run.name=share_kv-s42 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_1.2b \
  --set run.seed=42 \
  --set wandb.group=projection-sharing-1.2b \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run gqa8-s42 attnlab train configs/paper_qkv/1.2b/gqa8.yaml \
  --set model.remat=block \
  --set run.name=gqa8-s42 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_1.2b \
  --set run.seed=42 \
  --set wandb.group=projection-sharing-1.2b \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_kv_gqa8-s42 attnlab train configs/paper_qkv/1.2b/share_kv_gqa8.yaml \
  --set model.remat=block \
  --set run.name=share_kv_gqa8-s42 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_1.2b \
  --set run.seed=42 \
  --set wandb.group=projection-sharing-1.2b \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_kv_mqa-s42 attnlab train configs/paper_qkv/1.2b/share_kv_mqa.yaml \
  --set model.remat=block \
  --set run.name=share_kv_mqa-s42 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_1.2b \
  --set run.seed=42 \
  --set wandb.group=projection-sharing-1.2b \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run qkv-s43 attnlab train configs/paper_qkv/1.2b/qkv.yaml \
  --set model.remat=block \
  --set run.name=qkv-s43 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_1.2b \
  --set run.seed=43 \
  --set wandb.group=projection-sharing-1.2b \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_kv-s43 attnlab train configs/paper_qkv/1.2b/share_kv.yaml \
  --set model.remat=block \
  --set run.name=share_kv-s43 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_1.2b \
  --set run.seed=43 \
  --set wandb.group=projection-sharing-1.2b \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run gqa8-s43 attnlab train configs/paper_qkv/1.2b/gqa8.yaml \
  --set model.remat=block \
  --set run.name=gqa8-s43 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_1.2b \
  --set run.seed=43 \
  --set wandb.group=projection-sharing-1.2b \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_kv_gqa8-s43 attnlab train configs/paper_qkv/1.2b/share_kv_gqa8.yaml \
  --set model.remat=block \
  --set run.name=share_kv_gqa8-s43 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_1.2b \
  --set run.seed=43 \
  --set wandb.group=projection-sharing-1.2b \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_kv_mqa-s43 attnlab train configs/paper_qkv/1.2b/share_kv_mqa.yaml \
  --set model.remat=block \
  --set run.name=share_kv_mqa-s43 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_1.2b \
  --set run.seed=43 \
  --set wandb.group=projection-sharing-1.2b \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run qkv-s44 attnlab train configs/paper_qkv/1.2b/qkv.yaml \
  --set model.remat=block \
  --set run.name=qkv-s44 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_1.2b \
  --set run.seed=44 \
  --set wandb.group=projection-sharing-1.2b \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_kv-s44 attnlab train configs/paper_qkv/1.2b/share_kv.yaml \
  --set model.remat=block \
  --set run.name=share_kv-s44 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_1.2b \
  --set run.seed=44 \
  --set wandb.group=projection-sharing-1.2b \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run gqa8-s44 attnlab train configs/paper_qkv/1.2b/gqa8.yaml \
  --set model.remat=block \
  --set run.name=gqa8-s44 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_1.2b \
  --set run.seed=44 \
  --set wandb.group=projection-sharing-1.2b \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_kv_gqa8-s44 attnlab train configs/paper_qkv/1.2b/share_kv_gqa8.yaml \
  --set model.remat=block \
  --set run.name=share_kv_gqa8-s44 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_1.2b \
  --set run.seed=44 \
  --set wandb.group=projection-sharing-1.2b \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_kv_mqa-s44 attnlab train configs/paper_qkv/1.2b/share_kv_mqa.yaml \
  --set model.remat=block \
  --set run.name=share_kv_mqa-s44 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_1.2b \
  --set run.seed=44 \
  --set wandb.group=projection-sharing-1.2b \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
if [ "${#failed[@]}" -gt 0 ]; then
  echo "queue ended: ${#failed[@]} of 15 runs failed: ${failed[*]}"; exit 1
fi
echo "queue ended: all 15 runs ended"
