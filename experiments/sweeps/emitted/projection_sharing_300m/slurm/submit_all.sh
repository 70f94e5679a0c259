#!/usr/bin/env bash
# Every run of sweep projection_sharing_300m (experiments/sweeps/projection_sharing_300m.yaml).
# Written by `attnlab sweep --emit`; edit the spec and run it again rather than editing this file:
#   attnlab sweep experiments/sweeps/projection_sharing_300m.yaml --emit slurm --out experiments/sweeps/emitted/projection_sharing_300m/slurm
# Submits every job from the repository root. The manifest goes where the runs are, unless one is there.
set -euo pipefail
cd "$(dirname "$0")/../../../../.."
mkdir -p runs/sweeps/projection_sharing_300m/logs
mkdir -p runs/sweeps/projection_sharing_300m && { test -e runs/sweeps/projection_sharing_300m/sweep.json || cp experiments/sweeps/emitted/projection_sharing_300m/slurm/sweep.json runs/sweeps/projection_sharing_300m/sweep.json; }
job0=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/qkv-s42.sbatch)
echo "qkv-s42: job ${job0%%;*}"
job1=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/gqa4-s42.sbatch)
echo "gqa4-s42: job ${job1%%;*}"
job2=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/mqa-s42.sbatch)
echo "mqa-s42: job ${job2%%;*}"
job3=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/share_kv-s42.sbatch)
echo "share_kv-s42: job ${job3%%;*}"
job4=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/share_kv_gqa4-s42.sbatch)
echo "share_kv_gqa4-s42: job ${job4%%;*}"
job5=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/share_qk-s42.sbatch)
echo "share_qk-s42: job ${job5%%;*}"
job6=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/share_kv_mqa-s42.sbatch)
echo "share_kv_mqa-s42: job ${job6%%;*}"
job7=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/share_qkv-s42.sbatch)
echo "share_qkv-s42: job ${job7%%;*}"
job8=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/qkv-s43.sbatch)
echo "qkv-s43: job ${job8%%;*}"
job9=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/gqa4-s43.sbatch)
echo "gqa4-s43: job ${job9%%;*}"
job10=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/mqa-s43.sbatch)
echo "mqa-s43: job ${job10%%;*}"
job11=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/share_kv-s43.sbatch)
echo "share_kv-s43: job ${job11%%;*}"
job12=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/share_kv_gqa4-s43.sbatch)
echo "share_kv_gqa4-s43: job ${job12%%;*}"
job13=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/share_qk-s43.sbatch)
echo "share_qk-s43: job ${job13%%;*}"
job14=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/share_kv_mqa-s43.sbatch)
echo "share_kv_mqa-s43: job ${job14%%;*}"
job15=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/share_qkv-s43.sbatch)
echo "share_qkv-s43: job ${job15%%;*}"
job16=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/qkv-s44.sbatch)
echo "qkv-s44: job ${job16%%;*}"
job17=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/gqa4-s44.sbatch)
echo "gqa4-s44: job ${job17%%;*}"
job18=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/mqa-s44.sbatch)
echo "mqa-s44: job ${job18%%;*}"
job19=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/share_kv-s44.sbatch)
echo "share_kv-s44: job ${job19%%;*}"
job20=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/share_kv_gqa4-s44.sbatch)
echo "share_kv_gqa4-s44: job ${job20%%;*}"
job21=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/share_qk-s44.sbatch)
echo "share_qk-s44: job ${job21%%;*}"
job22=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/share_kv_mqa-s44.sbatch)
echo "share_kv_mqa-s44: job ${job22%%;*}"
job23=$(sbatch --parsable experiments/sweeps/emitted/projection_sharing_300m/slurm/share_qkv-s44.sbatch)
echo "share_qkv-s44: job ${job23%%;*}"
