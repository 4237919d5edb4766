#!/usr/bin/env bash
# Figure 8 on a Slurm cluster: one Slurm job per run (submitit), 8 GPUs each, then the report.
#
# Run it on a login node, inside tmux/screen: the sweep submits the jobs, waits for them, prints
# progress and writes runs/fig8_paper/{results.csv,results.md,figure8.png} at the end. Jobs keep
# running if the login session dies; run this script again and it skips finished runs, resumes
# interrupted ones from checkpoints/last.ckpt and retries failed ones.
#
#   scripts/fig8_slurm.sh                                  # the whole grid
#   scripts/fig8_slurm.sh --only num_registers=4           # one register count
#   scripts/fig8_slurm.sh --max_parallel 6                 # at most 6 jobs running at once
#   GRID=my_grid.yaml scripts/fig8_slurm.sh --dry_run true # see the plan first
#
# The partition, time limit, CPUs and memory of each job are the grid's launcher.slurm settings
# (submitit AutoExecutor parameters: slurm_partition, timeout_min, cpus_per_task, mem_gb, ...).
# Inside a job each run starts its own 8 DDP ranks (Lightning's launcher), as on a workstation.
set -euo pipefail
cd "$(dirname "$0")/.."
GRID="${GRID:-configs/fig8/paper.yaml}"
exec regablate sweep "$GRID" --launcher slurm --devices_per_run "${DEVICES_PER_RUN:-8}" "$@"
