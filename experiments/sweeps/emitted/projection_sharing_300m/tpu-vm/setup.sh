#!/usr/bin/env bash
# Every run of sweep projection_sharing_300m (experiments/sweeps/projection_sharing_300m.yaml).
# Written by `attnlab sweep --emit`; edit the spec and run it again rather than editing this file:
#   attnlab sweep experiments/sweeps/projection_sharing_300m.yaml --emit tpu-vm --out experiments/sweeps/emitted/projection_sharing_300m/tpu-vm
# TPU VM attnlab-v5p-16 in us-east5-a (v5p-16, 2 workers), the repository at ~/attnlab on every
# worker; the runs live in gs://BUCKET/attnlab.
# Prepares the TPU VM: the token stores the runs read copied to the bucket (once; meta.json last, so a copy
# that has it is complete), this checkout's committed HEAD copied to every worker and installed for the TPU.
set -euo pipefail
cd "$(dirname "$0")/../../../../.."
test -f data/slimpajama-gpt2/meta.json || { echo "error: token store data/slimpajama-gpt2 is not here: prepare it first (attnlab data prepare ... --out data/slimpajama-gpt2)" >&2; exit 2; }
gcloud storage ls gs://BUCKET/attnlab/stores/slimpajama-gpt2/meta.json >/dev/null 2>&1 || { gcloud storage rsync -r -x 'meta\.json$' data/slimpajama-gpt2 gs://BUCKET/attnlab/stores/slimpajama-gpt2 && gcloud storage cp data/slimpajama-gpt2/meta.json gs://BUCKET/attnlab/stores/slimpajama-gpt2/meta.json; }
[ -z "$(git status --porcelain --untracked-files=no)" ] || echo "warning: uncommitted changes are not copied (the workers get the committed HEAD)" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git archive --format=tar.gz -o "$tmp/attnlab-src.tar.gz" HEAD
gcloud compute tpus tpu-vm scp "$tmp/attnlab-src.tar.gz" attnlab-v5p-16:attnlab-src.tar.gz --worker=all --zone=us-east5-a
gcloud compute tpus tpu-vm ssh attnlab-v5p-16 --worker=all --zone=us-east5-a \
  --command 'mkdir -p attnlab && tar -xzf attnlab-src.tar.gz -C attnlab && cd attnlab && make install DEVICE=tpu && .venv/bin/python -m lm.devices tpu'
echo "every worker has the code and jax for the TPU; next: submit_all.sh"
