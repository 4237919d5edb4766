#!/usr/bin/env bash
# The GPU check: what only a GPU can tell about configs/fig8/paper.yaml, in one command of about
# 4 minutes on one H200 (README.md, "The GPU check"). One line per figure, each "gpu_check: ...":
#
#   1. DINO as paper_run.yaml trains it (ViT-L/14 at 224 px, 4 registers, bf16-mixed, 2 + 8 crops,
#      batch 64), random weights, synthetic scenes: images/s, peak GPU memory, model FLOP utilisation
#      against the H200 SXM's dense bf16 peak from NVIDIA's datasheet (989 TFLOP/s), with the
#      achievable matmul rate measured beside it;
#   2. the probe's extraction of that backbone against a plain forward_features loop (images/s, ratio);
#   3. `regablate probe` end to end on the GPU (a dry run, then every probe of a random ViT-S/14).
#
# Prepare the wheels here first (the GPU machine has no network): scripts/gpu_wheels.sh
# Then, on the GPU machine, from a copy of this checkout with .gpu_wheels/ in it:
#
#   scripts/gpu_check.sh [OUT]     # logs into OUT (default: $OUT, else runs/gpu_check)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-runs/gpu_check}}"
SITE="${GPU_CHECK_SITE:-/tmp/regablate-site}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MPLBACKEND=Agg
mkdir -p "$OUT"
started=$(date +%s)
ls .gpu_wheels/*.whl >/dev/null 2>&1 || { echo "gpu_check: no .gpu_wheels/: run scripts/gpu_wheels.sh here first" >&2; exit 2; }
pip_install=(python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
"${pip_install[@]}" .gpu_wheels/*.whl
"${pip_install[@]}" --no-build-isolation .    # regablate itself, without its dependencies
export PYTHONPATH="$SITE"
python3 -c "import regablate.cli, torch; print('gpu_check: installed regablate; torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu_check: nvidia-smi: /'
fi

python3 benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log"

probe=(python3 -m regablate probe --model vit_small_patch14_dinov2 --pretrained false --num_registers 4
       --img_size 224 --data.img_size 224 --data.train_size 4096 --data.val_size 1024 --data.test_size 1024
       --data.batch_size 128 --data.num_workers 8 --accelerator gpu --output "$OUT/probe")
"${probe[@]}" --dry_run true 2>&1 | tee "$OUT/probe_plan.log"
"${probe[@]}" 2>&1 | tee "$OUT/probe.log" | grep -E "^probe: extracting|^probe/|^results" | sed 's/^/gpu_check: probe command: /'
echo "gpu_check: total $(( $(date +%s) - started )) s"
