#!/usr/bin/env bash
# The GPU check: what only a GPU can tell about the paper path, in at most 8 minutes on one H200
# (docs/development.md, "The GPU check"). Three parts, each in a hard time box (it is stopped at its
# box and says so); one line per figure, each "gpu_check: ...", then "gpu_check: PASS|FAIL ...":
#
#   1. steps (box STEPS_S, default 220 s): DINO as paper_run.yaml trains it (ViT-L/14 at 224 px,
#      4 registers, bf16-mixed, 2 + 8 crops, batch 64), random weights, synthetic scenes, in four
#      variants: eager, eager with activation checkpointing, compiled, compiled with it. Per variant:
#      images/s, step time, peak GPU memory beside the memory model's estimate, and model FLOP
#      utilisation against the H200 SXM's dense bf16 peak from NVIDIA's datasheet (989 TFLOP/s, the
#      one MFU uses), with the matmul rate measured here printed beside it; then the probe's
#      extraction against a plain forward_features loop (benchmarks/gpu_check.py);
#   2. rehearsal (box REHEARSAL_S, default 170 s): `regablate sweep configs/fig8/rehearsal.yaml` on
#      the GPU (one device, bf16-mixed, the CPU rehearsal's global batch), report included, while
#      the same grid runs on this machine's CPUs as the reference: every stage exits 0, and the
#      fit's losses agree within bf16 tolerance (benchmarks/gpu_rehearsal.py says what is compared);
#   3. probe (box PROBE_S, default 60 s): `regablate probe` end to end on the GPU (a dry run, then
#      every probe of a random ViT-S/14).
#
# Prepare the wheels here first (the GPU machine has no network): scripts/gpu_wheels.sh
# Then, on the GPU machine, from a copy of this checkout with .gpu_wheels/ in it:
#
#   scripts/gpu_check.sh [OUT]     # logs into OUT (default: $OUT, else runs/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-runs/gpu_check}}"
SITE="${GPU_CHECK_SITE:-/tmp/regablate-site}"
STEPS_S="${STEPS_S:-220}" REHEARSAL_S="${REHEARSAL_S:-170}" PROBE_S="${PROBE_S:-60}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MPLBACKEND=Agg
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
started=$(date +%s)
ls .gpu_wheels/*.whl >/dev/null 2>&1 || { echo "gpu_check: no .gpu_wheels/: run scripts/gpu_wheels.sh here first" >&2; exit 2; }
pip_install=(python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
"${pip_install[@]}" .gpu_wheels/*.whl || exit 2
"${pip_install[@]}" --no-build-isolation . || exit 2   # regablate itself, without its dependencies
export PYTHONPATH="$SITE"
python3 -c "import regablate.cli, torch; print('gpu_check: installed regablate; torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu_check: nvidia-smi: /'
fi

verdicts=()
# box NAME SECONDS COMMAND...: run COMMAND, stopped at SECONDS; record "NAME ok|FAIL|stopped at its box".
box() {
    local name=$1 seconds=$2 begin code
    shift 2
    begin=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$seconds" "$@"
    code=$?
    if [[ $code == 124 || $code == 137 ]]; then
        echo "gpu_check: $name stopped at its time box ($seconds s)"
        verdicts+=("$name stopped at its ${seconds} s box")
    elif [[ $code == 0 ]]; then
        verdicts+=("$name ok")
    else
        verdicts+=("$name FAIL (exit $code)")
    fi
    echo "gpu_check: $name took $(( $(date +%s) - begin )) s (box $seconds s)"
}

figures() { echo "set -o pipefail; $1 2>&1 | tee '$OUT/$2' | grep --line-buffered '^gpu_check: '"; }  # a part's command line
box steps "$STEPS_S" bash -c "$(figures "python3 benchmarks/gpu_check.py" gpu_check.log)"
box rehearsal "$REHEARSAL_S" bash -c "$(figures "python3 benchmarks/gpu_rehearsal.py --output '$OUT/rehearsal'" rehearsal.log)"
probe="python3 -m regablate probe --model vit_small_patch14_dinov2 --pretrained false --num_registers 4 \
    --img_size 224 --data.img_size 224 --data.train_size 4096 --data.val_size 1024 --data.test_size 1024 \
    --data.batch_size 128 --data.num_workers 8 --accelerator gpu --output '$OUT/probe'"
box probe "$PROBE_S" bash -c "set -o pipefail; $probe --dry_run true >'$OUT/probe_plan.log' 2>&1 && $probe 2>&1 \
    | tee '$OUT/probe.log' | grep --line-buffered -E '^probe: extracting|^probe/|^results' | sed -u 's/^/gpu_check: probe command: /'"

summary=$(IFS=';'; echo "${verdicts[*]}" | sed 's/;/, /g')
total=$(( $(date +%s) - started ))
if [[ "$summary" == *FAIL* || "$summary" == *stopped* ]]; then
    echo "gpu_check: FAIL: $summary; total $total s"
    exit 1
fi
echo "gpu_check: PASS: $summary; total $total s"
