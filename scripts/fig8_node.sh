#!/usr/bin/env bash
# Figure 8 on one multi-GPU machine: runs packed onto its GPUs, each run a DDP job of its own.
#
# GPUs are split into groups of DEVICES_PER_RUN (CUDA_VISIBLE_DEVICES per run); as many runs as
# there are groups train at once. Stop it at any time (Ctrl-C, a crash, a reboot) and run it
# again: finished runs are skipped, interrupted ones resume from checkpoints/last.ckpt.
#
#   scripts/fig8_node.sh                                     # 8 GPUs per run, one run at a time
#   DEVICES_PER_RUN=2 scripts/fig8_node.sh --max_parallel 4  # 4 runs of 2 GPUs on an 8-GPU node
#   scripts/fig8_node.sh --only seed_everything=0            # one seed first
#   GRID=configs/fig8/cpu.yaml DEVICES_PER_RUN=1 scripts/fig8_node.sh   # the CPU grid, for a smoke test
#
# Progress goes to the terminal; each run's output to runs/<grid name>/<run>/sweep.log.
set -euo pipefail
cd "$(dirname "$0")/.."
GRID="${GRID:-configs/fig8/paper.yaml}"
exec regablate sweep "$GRID" --devices_per_run "${DEVICES_PER_RUN:-8}" "$@"
