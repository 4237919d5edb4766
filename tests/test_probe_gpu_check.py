"""The GPU check's pieces on the CPU: its measurements at tiny size, its scripts, and its wheel list."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

# What the lent GPU machine's python3 has (KINDS.md, seen there); everything else regablate needs travels as a wheel.
ON_THE_GPU_MACHINE = {"torch", "torchvision", "lightning", "torchmetrics", "tensorboard", "safetensors"}
ON_THE_GPU_MACHINE |= {"matplotlib", "pillow", "timm"}


def test_the_scripts_parse_and_the_wheels_cover_every_dependency_the_gpu_machine_lacks():
    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], check=True)
    wheels = re.search(r"^PACKAGES=\((.*)\)$", (REPO / "scripts" / "gpu_wheels.sh").read_text(), re.M).group(1).split()
    listed = re.search(r"^dependencies = \[(.*?)^\]", (REPO / "pyproject.toml").read_text(), re.M | re.S).group(1)
    names = {re.match(r'\s*"([A-Za-z0-9_.-]+)', line).group(1).lower() for line in listed.strip().splitlines()}
    assert {"torch", "datasets", "jsonargparse"} <= names
    assert names - ON_THE_GPU_MACHINE - set(wheels) == set(), "add the missing packages to gpu_wheels.sh"
    assert {"datasets", "dill", "multiprocess", "jsonargparse", "docstring-parser", "typeshed-client"} <= set(wheels)
    assert {"kornia", "kornia-rs"} <= set(wheels)  # DINO's photometric views
    check = (REPO / "scripts" / "gpu_check.sh").read_text()
    assert "--no-deps" in check and ".gpu_wheels" in check and "benchmarks/gpu_check.py" in check


@pytest.mark.slow
def test_the_gpu_checks_measurements_run_at_tiny_size_on_the_cpu():
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny"]
    command += ["--steps", "2", "--warmup", "3", "--batch_size", "8", "--workers", "0"]
    command += ["--probe_images", "16", "--probe_repeats", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("gpu_check: ")]
    text = "\n".join(lines)
    rate = re.search(r"dino vit_tiny_patch16_224 r4 32 px, 2x32 \+ 2x16 px crops, batch 8, bf16-mixed: ([\d.]+)", text)
    assert rate and float(rate.group(1)) > 0, text
    flops = re.search(r"dino FLOPs per image and step: ([\d.]+) GFLOP", text)
    assert flops and float(flops.group(1)) > 0, text
    assert re.search(r"dino model FLOP utilisation: [\d.]+% \([\d.]+ of 989 TFLOP/s datasheet", text), text
    assert re.search(r"matmul peak measured here: [\d.]+ TFLOP/s", text), text
    for side in ("plain", "extract \\(cls\\)", "extract \\(all\\)"):
        assert re.search(rf"probe {side} *: +[\d.]+ images/s", text), text
    assert re.search(r"probe extract \(cls\) / plain: [\d.]+", text), text
