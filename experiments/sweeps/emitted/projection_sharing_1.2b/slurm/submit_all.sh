#!/usr/bin/env bash
# Every run of sweep projection_sharing_1.2b (experiments/sweeps/projection_sharing_1.2b.yaml).
# Written by `attnlab sweep --emit`; edit the spec and run it again rather than editing this file:
#   attnlab sweep experiments/sweeps/projection_sharing_1.2b.yaml --emit slurm --out experiments/sweeps/emitted/projection_sharing_1.2b/slurm
# Submits every job from the repository root. The manifest goes where the runs are, unless one is there.
set -euo pipefail
cd "$(dirname "$0")/../../../../.."
mkdir -p runs/sweeps/projection_sharing_1.2b/logs
mkdir -p runs/sweeps/projection_sharing_1.2b && { test -e runs/sweeps/projection_sharing_1.2b/sweep.json || cp experiments/sweeps/emitted/projection_sharing_1.2b/slurm/sweep.json runs/sweeps/projection_sharing_1.2b/sweep.json; }
job0=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_1.2b/slurm/qkv-s42.sbatch)
echo "qkv-s42: job ${job0%%;*}"
job1=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_1.2b/slurm/share_kv-s42.sbatch)
echo "share_kv-s42: job ${job1%%;*}"
job2=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_1.2b/slurm/gqa8-s42.sbatch)
echo "gqa8-s42: job ${job2%%;*}"
job3=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_1.2b/slurm/share_kv_gqa8-s42.sbatch)
echo "share_kv_gqa8-s42: job ${job3%%;*}"
job4=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_1.2b/slurm/share_kv_mqa-s42.sbatch)
echo "share_kv_mqa-s42: job ${job4%%;*}"
job5=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_1.2b/slurm/qkv-s43.sbatch)
echo "qkv-s43: job ${job5%%;*}"
job6=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_1.2b/slurm/share_kv-s43.sbatch)
echo "share_kv-s43: job ${job6%%;*}"
job7=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_1.2b/slurm/gqa8-s43.sbatch)
echo "gqa8-s43: job ${job7%%;*}"
job8=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_1.2b/slurm/share_kv_gqa8-s43.sbatch)
echo "share_kv_gqa8-s43: job ${job8%%;*}"
job9=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_1.2b/slurm/share_kv_mqa-s43.sbatch)
echo "share_kv_mqa-s43: job ${job9%%;*}"
job10=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_1.2b/slurm/qkv-s44.sbatch)
echo "qkv-s44: job ${job10%%;*}"
job11=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_1.2b/slurm/share_kv-s44.sbatch)
echo "share_kv-s44: job ${job11%%;*}"
job12=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_1.2b/slurm/gqa8-s44.sbatch)
echo "gqa8-s44: job ${job12%%;*}"
job13=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_1.2b/slurm/share_kv_gqa8-s44.sbatch)
echo "share_kv_gqa8-s44: job ${job13%%;*}"
job14=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_1.2b/slurm/share_kv_mqa-s44.sbatch)
echo "share_kv_mqa-s44: job ${job14%%;*}"
