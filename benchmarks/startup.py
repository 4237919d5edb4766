"""Start-up costs: the CLI's time to answer, and the sweep's overhead per stage with and without its preloaded parent.

    python benchmarks/startup.py                       # 3 runs x (fit, probe), each way; 3 repeats of each command
    python benchmarks/startup.py --runs 2 --repeats 5 --threads 1

Printed side by side, all measured in this run (medians of ``--repeats``):

* the baselines: ``python -c "import torch"``, ``python -c "import torch, lightning, timm"``,
  ``python -c "import regablate.cli"``, and what a stage imports before its work
  (``regablate.sweep.preload.PRELOAD``, which ``import regablate.cli`` imported before the CLI
  imported its commands lazily);
* the CLI: ``regablate --help``, ``regablate sweep --help``, ``regablate sweep missing.yaml`` (a
  parse-time refusal), ``regablate report --help`` and ``regablate fit --help`` (LightningCLI's
  parser, built from the classes: it imports Lightning);
* a sweep of quickstart-sized runs (fit, then a small probe): each stage's overhead is its wall
  time as the sweep records it (``stages/<name>/seconds``) less the work it reports itself
  (``fit_seconds``, ``probe/seconds`` in ``summary.json``), with ``--preload true`` and ``false``.

Targets: per-stage overhead with the preloaded parent <= 0.25x the stage's imports (the issue's
``import regablate.cli`` of before); ``sweep --help`` and ``sweep missing.yaml`` <= 0.35x
``import torch, lightning, timm``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from regablate.runs import RunRecord
from regablate.sweep.preload import PRELOAD

REPO = Path(__file__).resolve().parents[1]
REGISTERS = (0, 1, 2, 4, 8, 16)
# A stage's own work, as it reports it in summary.json.
WORK_KEYS = {"fit": "fit_seconds", "probe": "probe/seconds"}


def wall(command: list[str], env: dict[str, str], cwd: Path, repeats: int, expect: int = 0) -> float:
    """Median wall time of ``command`` (its exit code checked)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        if result.returncode != expect:
            raise SystemExit(f"{' '.join(command)} exited {result.returncode}: {result.stderr[-500:]}")
    return statistics.median(times)


def grid_file(folder: Path, runs: int, steps: int) -> Path:
    grid = folder / "bench.yaml"
    grid.write_text(
        f"""grid:
  name: bench
  base: {REPO / "configs" / "quickstart.yaml"}
  overrides:
    trainer.max_steps: {steps}
    trainer.val_check_interval: {steps}
    trainer.enable_progress_bar: false
    data.init_args.val_size: 64
  axes:
    model.init_args.num_registers: {list(REGISTERS[:runs])}
  stages:
    - command: fit
    - command: probe
      args: {{--data.init_args.train_size: 64, --data.init_args.val_size: 32, --data.init_args.test_size: 32,
              --probe.fast.cls_steps: 10, --probe.fast.seg_steps: 10, --probe.fast.depth_steps: 10, --cache: false}}
"""
    )
    return grid


def stage_overheads(folder: Path, grid: Path, preload: str, env: dict[str, str]) -> tuple[list[float], float]:
    """Each stage's wall time less its own work, and the sweep's wall time."""
    output = folder / f"runs_{preload}"
    command = [sys.executable, "-m", "regablate", "sweep", str(grid), "--output", str(output)]
    started = time.perf_counter()
    subprocess.run([*command, "--report", "false", "--preload", preload], check=True, cwd=folder, env=env)
    seconds = time.perf_counter() - started
    overheads = []
    for run in sorted((output / "bench").iterdir()):
        summary = RunRecord(run).read()
        for stage, key in WORK_KEYS.items():
            overheads.append(summary[f"stages/{stage}/seconds"] - summary[key])
    return overheads, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--runs", type=int, default=3, help="register counts in the grid (from 0, 1, 2, 4, 8, 16)")
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per fit")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command (the median is shown)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    python = [sys.executable]
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        baselines = {
            "import torch": wall([*python, "-c", "import torch"], env, folder, args.repeats),
            "import torch, lightning, timm": wall(
                [*python, "-c", "import torch, lightning, timm"], env, folder, args.repeats
            ),
            "import regablate.cli": wall([*python, "-c", "import regablate.cli"], env, folder, args.repeats),
            "a stage's imports (PRELOAD)": wall(
                [*python, "-c", f"import {', '.join(PRELOAD)}"], env, folder, args.repeats
            ),
        }
        regablate = [*python, "-m", "regablate"]
        cli = {
            "regablate --help": wall([*regablate, "--help"], env, folder, args.repeats),
            "regablate sweep --help": wall([*regablate, "sweep", "--help"], env, folder, args.repeats),
            "regablate sweep missing.yaml": wall([*regablate, "sweep", "missing.yaml"], env, folder, args.repeats, 2),
            "regablate report --help": wall([*regablate, "report", "--help"], env, folder, args.repeats),
            "regablate fit --help": wall([*regablate, "fit", "--help"], env, folder, args.repeats),
        }
        grid = grid_file(folder, args.runs, args.steps)
        fresh, fresh_sweep = stage_overheads(folder, grid, "false", env)
        forked, forked_sweep = stage_overheads(folder, grid, "true", env)
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1, 5, 15 min)")
    for label, seconds in baselines.items():
        print(f"{label:<40} {seconds:7.2f} s")
    heavy = baselines["import torch, lightning, timm"]
    for label, seconds in cli.items():
        print(f"{label:<40} {seconds:7.2f} s  {seconds / heavy:5.2f}x import torch, lightning, timm")
    stages, imports = 2 * args.runs, baselines["a stage's imports (PRELOAD)"]
    for label, overheads, sweep_seconds in (("new process", fresh, fresh_sweep), ("preloaded", forked, forked_sweep)):
        median = statistics.median(overheads)
        print(
            f"per-stage overhead, {label:<12} {median:7.2f} s  {median / baselines['import regablate.cli']:5.2f}x "
            f"import regablate.cli, {median / imports:5.2f}x a stage's imports "
            f"(median of {stages} stages; sweep {sweep_seconds:.1f} s)"
        )
    print(f"preloaded / new process, per-stage overhead: {statistics.median(forked) / statistics.median(fresh):.2f}")
    print("targets: preloaded per-stage overhead <= 0.25x; sweep --help and sweep missing.yaml <= 0.35x")


if __name__ == "__main__":
    main()
