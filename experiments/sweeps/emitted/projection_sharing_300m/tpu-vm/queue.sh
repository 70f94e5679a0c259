#!/usr/bin/env bash
# Every run of sweep projection_sharing_300m (experiments/sweeps/projection_sharing_300m.yaml).
# Written by `attnlab sweep --emit`; edit the spec and run it again rather than editing this file:
#   attnlab sweep experiments/sweeps/projection_sharing_300m.yaml --emit tpu-vm --out experiments/sweeps/emitted/projection_sharing_300m/tpu-vm
# Runs on every worker of the TPU VM, started detached by submit_all.sh: every run in order. A run that fails
# is named and the queue goes on; at the end it names the runs that failed. Each run's output is in
# ~/attnlab-logs/projection_sharing_300m/RUN.log and, after the run, in the bucket's logs/RUN.WORKER.log.
set -uo pipefail
cd attnlab
source .venv/bin/activate
logs=~/attnlab-logs/projection_sharing_300m
mkdir -p "$logs"
failed=()
run() {  # NAME COMMAND...
  local name=$1 status=0; shift
  echo "$(date '+%F %T') $name: starting"
  "$@" >> "$logs/$name.log" 2>&1 || status=$?
  if [ "$status" = 0 ]; then echo "$(date '+%F %T') $name: ended"; else
    echo "$(date '+%F %T') $name: failed with exit status $status (its log: $logs/$name.log)"; failed+=("$name"); fi
  gcloud storage cp "$logs/$name.log" gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m/logs/"$name.$(hostname).log" >/dev/null 2>&1 || echo "could not copy $name's log to the bucket"
}
run qkv-s42 attnlab train configs/paper_qkv/300m/qkv.yaml \
  --set model.remat=block \
  --set run.name=qkv-s42 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=42 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run gqa4-s42 attnlab train configs/paper_qkv/300m/gqa4.yaml \
  --set model.remat=block \
  --set run.name=gqa4-s42 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=42 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run mqa-s42 attnlab train configs/paper_qkv/300m/mqa.yaml \
  --set model.remat=block \
  --set run.name=mqa-s42 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=42 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_kv-s42 attnlab train configs/paper_qkv/300m/share_kv.yaml \
  --set model.remat=block \
  --set run.name=share_kv-s42 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=42 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_kv_gqa4-s42 attnlab train configs/paper_qkv/300m/share_kv_gqa4.yaml \
  --set model.remat=block \
  --set run.name=share_kv_gqa4-s42 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=42 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_qk-s42 attnlab train configs/paper_qkv/300m/share_qk.yaml \
  --set model.remat=block \
  --set run.name=share_qk-s42 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=42 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_kv_mqa-s42 attnlab train configs/paper_qkv/300m/share_kv_mqa.yaml \
  --set model.remat=block \
  --set run.name=share_kv_mqa-s42 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=42 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_qkv-s42 attnlab train configs/paper_qkv/300m/share_qkv.yaml \
  --set model.remat=block \
  --set run.name=share_qkv-s42 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=42 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run qkv-s43 attnlab train configs/paper_qkv/300m/qkv.yaml \
  --set model.remat=block \
  --set run.name=qkv-s43 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=43 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run gqa4-s43 attnlab train configs/paper_qkv/300m/gqa4.yaml \
  --set model.remat=block \
  --set run.name=gqa4-s43 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=43 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run mqa-s43 attnlab train configs/paper_qkv/300m/mqa.yaml \
  --set model.remat=block \
  --set run.name=mqa-s43 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=43 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_kv-s43 attnlab train configs/paper_qkv/300m/share_kv.yaml \
  --set model.remat=block \
  --set run.name=share_kv-s43 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=43 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_kv_gqa4-s43 attnlab train configs/paper_qkv/300m/share_kv_gqa4.yaml \
  --set model.remat=block \
  --set run.name=share_kv_gqa4-s43 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=43 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_qk-s43 attnlab train configs/paper_qkv/300m/share_qk.yaml \
  --set model.remat=block \
  --set run.name=share_qk-s43 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=43 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_kv_mqa-s43 attnlab train configs/paper_qkv/300m/share_kv_mqa.yaml \
  --set model.remat=block \
  --set run.name=share_kv_mqa-s43 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=43 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_qkv-s43 attnlab train configs/paper_qkv/300m/share_qkv.yaml \
  --set model.remat=block \
  --set run.name=share_qkv-s43 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=43 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run qkv-s44 attnlab train configs/paper_qkv/300m/qkv.yaml \
  --set model.remat=block \
  --set run.name=qkv-s44 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=44 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run gqa4-s44 attnlab train configs/paper_qkv/300m/gqa4.yaml \
  --set model.remat=block \
  --set run.name=gqa4-s44 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=44 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run mqa-s44 attnlab train configs/paper_qkv/300m/mqa.yaml \
  --set model.remat=block \
  --set run.name=mqa-s44 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=44 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_kv-s44 attnlab train configs/paper_qkv/300m/share_kv.yaml \
  --set model.remat=block \
  --set run.name=share_kv-s44 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=44 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_kv_gqa4-s44 attnlab train configs/paper_qkv/300m/share_kv_gqa4.yaml \
  --set model.remat=block \
  --set run.name=share_kv_gqa4-s44 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=44 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_qk-s44 attnlab train configs/paper_qkv/300m/share_qk.yaml \
  --set model.remat=block \
  --set run.name=share_qk-s44 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=44 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_kv_mqa-s44 attnlab train configs/paper_qkv/300m/share_kv_mqa.yaml \
  --set model.remat=block \
  --set run.name=share_kv_mqa-s44 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=44 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
run share_qkv-s44 attnlab train configs/paper_qkv/300m/share_qkv.yaml \
  --set model.remat=block \
  --set run.name=share_qkv-s44 \
  --set run.out_dir=gs://BUCKET/attnlab/runs/sweeps/projection_sharing_300m \
  --set run.seed=44 \
  --set wandb.group=projection-sharing-300m \
  --set data.source=gs://BUCKET/attnlab/stores/slimpajama-gpt2 \
  --set run.platform=tpu
if [ "${#failed[@]}" -gt 0 ]; then
  echo "queue ended: ${#failed[@]} of 24 runs failed: ${failed[*]}"; exit 1
fi
echo "queue ended: all 24 runs ended"
