"""What the sweep costs on top of its runs: sweep wall time against the sum of its stages' own wall times.

    python benchmarks/sweep_overhead.py                     # 3 quickstart-sized runs of 60 steps, fit only
    python benchmarks/sweep_overhead.py --steps 150 --runs 4

A stage's own wall time is its process from start to exit, as the sweep records it in
``stages/<name>/seconds`` (forked from the sweep's preloaded parent by default: see
``benchmarks/startup.py`` for what that saves against a new ``python -m regablate`` per stage).
The overhead is the sweep's start-up, config resolution, scheduling and bookkeeping. The report
is timed apart (it is work of its own, not overhead). Target: the
ratio is at most 1.05.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from regablate.runs import RunRecord

REPO = Path(__file__).resolve().parents[1]
REGISTERS = (0, 1, 2, 4, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--runs", type=int, default=3, help="register counts in the grid (from 0, 1, 2, 4, 8, 16)")
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps per run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        grid = Path(folder) / "bench.yaml"
        grid.write_text(
            f"""grid:
  name: bench
  base: {REPO / "configs" / "quickstart.yaml"}
  overrides:
    trainer.max_steps: {args.steps}
    trainer.val_check_interval: {args.steps}
    trainer.enable_progress_bar: false
  axes:
    model.init_args.num_registers: {list(REGISTERS[: args.runs])}
  stages: [{{command: fit}}]
"""
        )
        command = [sys.executable, "-m", "regablate", "sweep", str(grid), "--output", str(Path(folder) / "runs")]
        started = time.perf_counter()
        subprocess.run([*command, "--no-report"], check=True, cwd=folder, stdout=subprocess.DEVNULL)
        sweep_seconds = time.perf_counter() - started
        experiment = Path(folder) / "runs" / "bench"
        stage_seconds = sum(
            value
            for run in experiment.iterdir()
            for key, value in RunRecord(run).read().items()
            if key.startswith("stages/") and key.endswith("/seconds")
        )
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "regablate", "report", str(experiment)],
            check=True,
            cwd=folder,
            stdout=subprocess.DEVNULL,
        )
        report_seconds = time.perf_counter() - started
    print(f"{args.runs} runs x {args.steps} steps (fit only)")
    print(f"sum of stage processes' wall time: {stage_seconds:8.1f} s")
    print(f"sweep wall time:                   {sweep_seconds:8.1f} s")
    print(f"overhead ratio (sweep / stages):   {sweep_seconds / stage_seconds:8.3f}  (target <= 1.05)")
    print(
        f"overhead in seconds (mostly the sweep's own start-up, fixed per sweep): {sweep_seconds - stage_seconds:.1f} s"
    )
    print(f"report (regablate report) alone:   {report_seconds:8.1f} s")


if __name__ == "__main__":
    main()
