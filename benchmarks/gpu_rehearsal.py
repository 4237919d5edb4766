"""The GPU check's rehearsal part: a grid swept on the device, beside the same grid swept on the CPU, compared.

Both sweeps run at once in ``--output``: the device's as ``<output>/device``, the CPU reference's
(exactly as the grid says, with no GPU visible) as ``<output>/cpu``, or ``--reference`` names a
CPU sweep of the grid made before; ``scripts/prepare_rehearsal.py`` writes the rehearsal's data
there first. The device sweep runs the grid through a grid that extends it (``device_grid``):
``--accelerator`` and ``--precision``, one device per run, and the batch per device times the
grid's devices per run, so that each step sees the global batch the CPU's DDP ranks see (one
process equals DDP on the same global batch: tests/test_ddp.py).

Compared, per run of the device sweep, within ``--rtol`` (bf16 keeps 8 bits of mantissa, 2^-8 =
0.4 % per rounding):

- ``train/loss`` at every logged step, and ``val/loss`` (summary.json): the same data, crops,
  views and masks in the same order, so they differ by rounding only;
- not compared: the probes' metrics (a top-1 over a few dozen images moves by 1/N with one flipped
  prediction; an mIoU or an RMSE of heads trained 20 iterations amplifies rounding), printed side
  by side and required to exist.

Every stage of every run must finish (exit 0, ``complete`` in summary.json) and the report must be
written. One line per figure, each ``gpu_check: rehearsal ...``; exit 1 when anything fails.

    python benchmarks/gpu_rehearsal.py --output runs/gpu_check/rehearsal
    python benchmarks/gpu_rehearsal.py --output /tmp/r --accelerator cpu --precision 32-true --grid GRID --prepare false
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from regablate.sweep.grid import load_grid

REPO = Path(__file__).resolve().parents[1]
REHEARSAL = REPO / "configs" / "fig8" / "rehearsal.yaml"
PROBE_KEYS = ("probe/cls_top1", "probe/seg_miou", "probe/depth_rmse")


def line(text: str) -> None:
    print(f"gpu_check: rehearsal {text}", flush=True)


def device_grid(grid: Path, output: Path, accelerator: str, precision: str) -> Path:
    """A grid extending ``grid`` that runs each run on one ``accelerator`` device at the same global batch."""
    loaded = load_grid(grid)
    devices = loaded.launcher.devices_per_run or 1
    overrides: dict[str, object] = {"trainer.accelerator": accelerator, "trainer.precision": precision}
    batch = loaded.overrides.get("data.init_args.batch_size")
    if devices > 1:
        if batch is None:
            raise SystemExit(f"{grid}: {devices} devices per run need data.init_args.batch_size in its overrides")
        overrides["data.init_args.batch_size"] = int(batch) * devices
    spec = {
        "grid": {
            "extends": str(grid.resolve()),
            "name": f"{loaded.name}_device",
            "overrides": overrides,
            "launcher": {"devices_per_run": 1},
        }
    }
    path = output / "device_grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def losses(run: Path) -> dict[int, float]:
    """``train/loss`` by step from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    if "train/loss" not in events.Tags().get("scalars", []):
        return {}
    return {event.step: event.value for event in events.Scalars("train/loss")}


def agreement(label: str, cpu: float, device: float, rtol: float) -> bool:
    """Print one compared figure; True when both are finite and within ``rtol`` of each other."""
    agree = math.isfinite(cpu) and math.isfinite(device) and abs(cpu - device) <= rtol * max(abs(cpu), abs(device))
    line(f"{label}: cpu {cpu:.5f}, device {device:.5f} ({'ok' if agree else 'FAIL'}, rtol {rtol:g})")
    return agree


def compare(cpu: Path, device: Path, rtol: float) -> bool:
    """One line per compared figure and per run's stages; True when every stage finished and every figure agrees."""
    ok = True
    runs = sorted(p.parent.name for p in device.glob("*/summary.json"))
    if not runs:
        line(f"FAIL: no run finished on the device ({device})")
        return False
    for name in runs:
        summary = json.loads((device / name / "summary.json").read_text())
        path = cpu / name / "summary.json"
        if not path.is_file():
            line(f"{name}: FAIL: not in the CPU reference {cpu}")
            ok = False
            continue
        reference = json.loads(path.read_text())
        stages = {key[7:]: value for key, value in summary.items() if key.startswith("stages/") and key.count("/") == 1}
        finished = summary.get("status") == "complete" and all(v == "complete" for v in stages.values())
        ok &= finished
        states = ", ".join(f"{stage} {state}" for stage, state in stages.items())
        line(f"{name}: stages {states}: {'ok' if finished else 'FAIL'}")
        steps_cpu, steps_device = losses(cpu / name), losses(device / name)
        if not steps_cpu or sorted(steps_cpu) != sorted(steps_device):
            line(f"{name} train/loss: FAIL: steps {sorted(steps_cpu)} on the CPU, {sorted(steps_device)} on the device")
            ok = False
        for step in sorted(steps_cpu.keys() & steps_device.keys()):
            ok &= agreement(f"{name} train/loss step {step}", steps_cpu[step], steps_device[step], rtol)
        val_cpu, val_device = (float(s.get("val/loss", math.nan)) for s in (reference, summary))
        ok &= agreement(f"{name} val/loss", val_cpu, val_device, rtol)
        for key in PROBE_KEYS:
            if key in reference:
                present = key in summary and math.isfinite(float(summary[key]))
                ok &= present
                value = f"{float(summary[key]):.4f}" if key in summary else "missing"
                verdict = "not compared" if present else "FAIL: missing"
                line(f"{name} {key}: cpu {float(reference[key]):.4f}, device {value} ({verdict})")
    return ok


def sweep(grid: Path, output: Path, only: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "regablate", "sweep", str(grid), "--output", str(output)]
    command += [arg for item in only for arg in ("--only", item)]
    with open(output.parent / log, "w") as handle:
        return subprocess.Popen(command, cwd=output.parent, stdout=handle, stderr=subprocess.STDOUT, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--output", type=Path, required=True, help="work folder (data, both sweeps, logs)")
    parser.add_argument("--grid", type=Path, default=REHEARSAL)
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--rtol", type=float, default=0.05, help="relative tolerance of the compared losses")
    parser.add_argument("--only", action="append", default=[], help="KEY=VALUE: keep these runs (as the sweep's)")
    parser.add_argument("--prepare", choices=["true", "false"], default="true", help="write the rehearsal's data")
    parser.add_argument("--reference", type=Path, help="a CPU sweep of the grid (its experiment folder)")
    args = parser.parse_args()
    output = args.output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.prepare == "true" and not (output / "data" / "rehearsal").is_dir():
        prepare = [sys.executable, str(REPO / "scripts" / "prepare_rehearsal.py"), "--output", "data/rehearsal"]
        subprocess.run(prepare, cwd=output, check=True, capture_output=True)
        line(f"data prepared in {time.perf_counter() - started:.0f} s")
    grid = device_grid(args.grid, output, args.accelerator, args.precision)
    no_gpu = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the reference's probes (accelerator auto) stay on the CPU too
    sweeps = {} if args.reference else {"cpu": sweep(args.grid, output / "cpu", args.only, "cpu.log", no_gpu)}
    sweeps["device"] = sweep(grid, output / "device", args.only, "device.log")
    codes = {name: process.wait() for name, process in sweeps.items()}
    for name, code in codes.items():
        line(f"{name} sweep ({name}.log): exit {code}")
    name = load_grid(args.grid).name
    cpu = args.reference.resolve() if args.reference else output / "cpu" / name
    experiments = {"cpu": cpu, "device": output / "device" / f"{name}_device"}
    reports = [experiments["device"] / report for report in ("results.csv", "results.md", "figure8.png")]
    written = all(path.is_file() for path in reports)
    line(f"device report: {'written' if written else 'FAIL: missing'} ({', '.join(p.name for p in reports)})")
    ok = compare(experiments["cpu"], experiments["device"], args.rtol) and written and set(codes.values()) == {0}
    line(f"{'ok' if ok else 'FAIL'} in {time.perf_counter() - started:.0f} s")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
