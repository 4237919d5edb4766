#!/usr/bin/env bash
# Figure 8 on a Slurm cluster: the runs as one job array (submitit), one task per GPU, then the report.
#
# Run it on a login node, inside tmux/screen: the sweep checks that Slurm can run one run's job
# (sbatch --test-only), submits the array (launcher.max_parallel runs at once), prints each job
# id, waits, and writes runs/fig8_paper/{results.csv,results.md,figure8.png} at the end.
#
# Each run's job has NODES_PER_RUN x DEVICES_PER_RUN tasks (srun); its fit is one DDP world across
# them (Lightning's SLURMEnvironment); the probes run once, on the job's first task. Slurm sends
# SIGUSR1 launcher.slurm.slurm_signal_delay_s before the time limit: the fit saves
# checkpoints/last.ckpt at its next step and the job requeues itself (at most launcher.max_requeues
# times), then goes on from that checkpoint. Jobs keep running if the login session dies; run this
# script again and it waits for the runs still in Slurm, skips finished ones and resubmits the rest.
#
#   scripts/fig8_slurm.sh                                  # the whole grid, 8 GPUs per run
#   NODES_PER_RUN=2 scripts/fig8_slurm.sh                  # each run on 2 nodes x 8 GPUs (16 ranks)
#   scripts/fig8_slurm.sh --only num_registers=4           # one register count
#   scripts/fig8_slurm.sh --max_parallel 18                # all 18 runs at once
#   scripts/fig8_slurm.sh --status true                    # queued / running / finished / failed, ETA
#   GRID=my_grid.yaml scripts/fig8_slurm.sh --dry_run true # see the plan and the job first
#
# Partition, time limit, CPUs and memory of each job are the grid's launcher.slurm settings
# (submitit AutoExecutor parameters: slurm_partition, timeout_min, cpus_per_task, mem_gb, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
GRID="${GRID:-configs/fig8/paper.yaml}"
exec regablate sweep "$GRID" --launcher slurm --devices_per_run "${DEVICES_PER_RUN:-8}" \
    --nodes_per_run "${NODES_PER_RUN:-1}" "$@"
