"""The sweep's data preflight against the plan it is added to (``regablate sweep GRID --dry_run true``).

    python benchmarks/sweep_preflight.py                       # configs/fig8/cpu.yaml and paper.yaml
    python benchmarks/sweep_preflight.py configs/fig8/cpu.yaml --repeats 7

For each grid: the time to make the plan (every run's config resolved by LightningCLI's parser,
and its probe/inspect stages' arguments parsed by their tool's parser), the time of the preflight
(every pending stage's data checked from metadata), medians over the repeats, and their ratio.
The plan of a fresh process also builds the probe's parser once (first repeat); later repeats
reuse it, as the sweep does within one call.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from regablate.sweep.grid import load_grid
from regablate.sweep.plan import make_plan
from regablate.sweep.preflight import preflight

REPO = Path(__file__).resolve().parents[1]


def measure(grid_path: Path, repeats: int) -> None:
    grid = load_grid(grid_path)
    plans, checks = [], []
    with tempfile.TemporaryDirectory() as out:
        for _ in range(repeats):
            started = time.perf_counter()
            plan = make_plan(grid, grid.runs, Path(out) / grid.name, None)
            plans.append(time.perf_counter() - started)
            started = time.perf_counter()
            reports = preflight(grid, plan.resolved, {job.run.name: job.pending_stages() for job in plan.jobs})
            checks.append(time.perf_counter() - started)
    plan_s, check_s = statistics.median(plans), statistics.median(checks)
    print(f"{grid_path.relative_to(REPO)}: {len(grid.runs)} runs x {len(grid.stages)} stages")
    print(f"  plan {plan_s:.3f} s, preflight {check_s:.3f} s (first {checks[0]:.3f} s): ratio {check_s / plan_s:.2f}")
    for report in reports:
        print(f"  {report.line().strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("grids", nargs="*", default=["configs/fig8/cpu.yaml", "configs/fig8/paper.yaml"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for grid in args.grids:
        measure((REPO / grid).resolve(), args.repeats)


if __name__ == "__main__":
    main()
