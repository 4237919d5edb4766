#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh installs on a GPU machine that has no network.
#
# The lent GPU machine's python3 (CPython 3.12) has torch, lightning, timm, torchmetrics,
# tensorboard, safetensors, torchvision, matplotlib, pandas, pyarrow, xxhash and huggingface_hub,
# but not jsonargparse (with its signature extras), datasets (nor its dill and multiprocess),
# submitit or kornia (nor its kornia-rs). This downloads those, and timm, at the versions of the
# environment PYTHON runs in (the versions the tests pass with), as wheels for CPython 3.12 into
# .gpu_wheels/ (git-ignored).
#
#   scripts/gpu_wheels.sh [PYTHON]      # PYTHON: an environment with regablate installed (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-python3}"
PACKAGES=(jsonargparse docstring-parser typeshed-client datasets dill multiprocess submitit timm kornia kornia-rs)
read -r -a pins < <("$PYTHON" - "${PACKAGES[@]}" <<'PY'
import sys
from importlib.metadata import version

print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PY
)
rm -rf .gpu_wheels
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest .gpu_wheels "${pins[@]}"
ls .gpu_wheels
