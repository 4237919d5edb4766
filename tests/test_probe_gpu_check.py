"""The GPU check's pieces on the CPU: its measurements at tiny size, its scripts, and its wheel list."""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from regablate.tasks import BackboneTask
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


# The variants the CPU test runs: eager, and eager with activation checkpointing once the tasks have the switch
# (compiling on a CPU takes minutes; the switch's own tests cover it).
VARIANTS = ["eager", *(["eager+ckpt"] if "grad_checkpointing" in inspect.signature(BackboneTask).parameters else [])]


@pytest.mark.slow
def test_the_gpu_checks_measurements_run_at_tiny_size_on_the_cpu():
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny"]
    command += ["--steps", "2", "--warmup", "3", "--batch_size", "8", "--workers", "0"]
    command += ["--probe_images", "16", "--probe_repeats", "1", "--variants", ",".join(VARIANTS)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("gpu_check: ")]
    text = "\n".join(lines)
    for variant in VARIANTS:
        tag = re.escape(f"dino[{variant}]")
        crops = r"r4 32 px, 2x32 \+ 2x16 px crops, batch 8, bf16-mixed"
        rate = re.search(rf"{tag} vit_tiny_patch16_224 {crops}: ([\d.]+)", text)
        assert rate and float(rate.group(1)) > 0, text
        assert re.search(rf"{tag} peak GPU memory: n/a on cpu \(memory model: [\d.]+ GiB\)", text), text
        assert re.search(rf"{tag} model FLOP utilisation: [\d.]+% \([\d.]+ of 989 TFLOP/s datasheet peak; ", text)
    flops = re.search(r"dino FLOPs per image and step: ([\d.]+) GFLOP", text)
    assert flops and float(flops.group(1)) > 0, text
    assert re.search(r"matmul peak measured here: [\d.]+ TFLOP/s", text), text
    assert "matmul peak from the datasheet: 989 TFLOP/s (MFU uses this one)" in text
    for side in ("plain", "extract \\(cls\\)", "extract \\(all\\)"):
        assert re.search(rf"probe {side} *: +[\d.]+ images/s", text), text
    assert re.search(r"probe extract \(cls\) / plain: [\d.]+", text), text


def gpu_rehearsal():
    """benchmarks/gpu_rehearsal.py as a module."""
    spec = importlib.util.spec_from_file_location("gpu_rehearsal", REPO / "benchmarks" / "gpu_rehearsal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(experiment: Path, name: str, losses: list[float], val_loss: float, stage: str = "complete") -> None:
    from torch.utils.tensorboard import SummaryWriter

    run = experiment / name
    with SummaryWriter(str(run)) as writer:
        for step, loss in enumerate(losses):
            writer.add_scalar("train/loss", loss, step)
    summary = {"status": "complete", "stages/fit": "complete", "stages/probe_cls": stage}
    (run / "summary.json").write_text(json.dumps({**summary, "val/loss": val_loss, "probe/cls_top1": 0.25}))


def test_the_rehearsal_comparison_passes_rounding_and_fails_a_difference_or_an_unfinished_stage(tmp_path, capsys):
    compare = gpu_rehearsal().compare
    fake_run(tmp_path / "cpu", "r0_s0", [5.5, 5.4], 5.3)
    fake_run(tmp_path / "close", "r0_s0", [5.5 * 1.01, 5.4 * 0.99], 5.3 * 1.02)
    fake_run(tmp_path / "far", "r0_s0", [5.5, 5.4 * 1.2], 5.3)
    fake_run(tmp_path / "unfinished", "r0_s0", [5.5, 5.4], 5.3, stage="failed")
    assert compare(tmp_path / "cpu", tmp_path / "close", rtol=0.05)
    out = capsys.readouterr().out
    assert "gpu_check: rehearsal r0_s0 train/loss step 1: cpu 5.40000, device 5.34600 (ok, rtol 0.05)" in out
    assert "gpu_check: rehearsal r0_s0 probe/cls_top1: cpu 0.2500, device 0.2500 (not compared)" in out
    assert not compare(tmp_path / "cpu", tmp_path / "far", rtol=0.05)
    assert "r0_s0 train/loss step 1: cpu 5.40000, device 6.48000 (FAIL" in capsys.readouterr().out
    assert not compare(tmp_path / "cpu", tmp_path / "unfinished", rtol=0.05)
    assert "r0_s0: stages fit complete, probe_cls failed: FAIL" in capsys.readouterr().out
