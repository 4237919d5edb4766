"""``regablate sweep GRID.yaml``: run every point of a register-count grid, then write its report.

    regablate sweep configs/fig8/cpu.yaml                       # the whole CPU grid, then the report
    regablate sweep configs/fig8/cpu.yaml --dry-run             # the plan: runs, their state, commands
    regablate sweep configs/fig8/cpu.yaml --only num_registers=4 --only seed_everything=0
    regablate sweep configs/fig8/paper.yaml --devices-per-run 8 --launcher slurm

Runs land in ``<output>/<grid name>/<run>/``. Finished stages are never re-run, an interrupted
run resumes from ``last.ckpt``, a failed run is recorded and the others go on; the command
exits non-zero at the end when any run failed. Run the same command again to finish a grid.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from jsonargparse import ArgumentParser

from regablate.errors import RegablateError
from regablate.sweep.grid import Grid, Stage, load_grid
from regablate.sweep.launch import LocalLauncher, RunJob, SlurmLauncher, device_slots, stage_command
from regablate.sweep.state import CONFIG_FILE, LOG_FILE, mark_finished, mark_running
from regablate.summary import write_text_atomic


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="regablate sweep",
        description="Run a register-count grid (see configs/fig8/): every run, its probes, then the Figure 8 report.",
        exit_on_error=False,
    )
    parser.add_argument("grid", type=str, help="grid file, e.g. configs/fig8/cpu.yaml")
    parser.add_argument("--output", type=str, default="runs", help="runs folder; the grid writes <output>/<grid name>/")
    parser.add_argument("--only", action="append", default=[], help="keep runs whose axis KEY=VALUE (repeatable; KEY may be the last part, e.g. num_registers=4)")
    parser.add_argument("--max-parallel", type=Optional[int], default=None, help="runs at once (default: the grid's, else 1)")
    parser.add_argument("--devices-per-run", type=Optional[int], default=None, help="devices of each run (sets trainer.devices; GPUs are packed per run)")
    parser.add_argument("--launcher", type=Literal["local", "slurm"], default="local", help="local processes, or Slurm jobs through submitit")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--no-report", action="store_true", help="skip the report when the runs end")
    return parser


def main(argv: list[str]) -> None:
    """Entry point of ``regablate sweep`` (errors surface as RegablateError / ArgumentError)."""
    args = build_parser().parse_args(argv)
    grid = load_grid(args.grid)
    runs = [run for run in grid.runs if run.matches(_filters(args.only))]
    if not runs:
        raise RegablateError(f"--only {' '.join(args.only)} matches no run of {args.grid}; axes: {', '.join(grid.axes)}")
    max_parallel = args.max_parallel or grid.launcher.get("max_parallel") or 1
    devices_per_run = args.devices_per_run or grid.launcher.get("devices_per_run")
    experiment = Path(args.output) / grid.name
    plan = make_plan(grid, runs, experiment, devices_per_run)
    if args.dry_run:
        print_plan(grid, plan, experiment, max_parallel, devices_per_run, args.launcher)
        return
    write_configs(plan)
    progress = Progress(total=len(plan.jobs) + len(plan.complete) + len(plan.invalid), done=len(plan.complete))
    for job, message in plan.invalid:
        record_invalid(job, message)
        progress.on_event("done", job, False)
    print(f"sweep {grid.name}: {progress.total} runs, {len(plan.complete)} already complete, {len(plan.jobs)} to run -> {experiment}/", flush=True)
    if args.launcher == "slurm":
        launcher: LocalLauncher | SlurmLauncher = SlurmLauncher(
            experiment / "slurm", grid.launcher.get("slurm") or {}, args.max_parallel, devices_per_run, progress.on_event
        )
    else:
        launcher = LocalLauncher(device_slots(max_parallel, devices_per_run, _num_gpus(devices_per_run)), progress.on_event)
    launcher.run(plan.jobs)
    if not args.no_report and grid.report.get("enabled", True):
        from regablate.sweep.report import write_report

        paths = write_report(experiment, grid=grid)
        print(f"report: {', '.join(str(p) for p in paths)}", flush=True)
    if progress.failed:
        logs = ", ".join(str(experiment / name / LOG_FILE) for name in progress.failed)
        raise RegablateError(f"{len(progress.failed)} of {progress.total} runs failed: {', '.join(progress.failed)} (logs: {logs}); run the same command again to retry them")
    print(f"sweep {grid.name}: all {progress.total} runs complete in {_duration(time.perf_counter() - progress.started)}", flush=True)


@dataclass
class Plan:
    """The grid's runs sorted by what is left: ``jobs`` to run, ``complete`` ones, and ``invalid`` configs."""

    jobs: list[RunJob] = field(default_factory=list)
    resolved: dict[str, str] = field(default_factory=dict)  # run name -> its resolved config (YAML)
    complete: list[RunJob] = field(default_factory=list)
    invalid: list[tuple[RunJob, str]] = field(default_factory=list)


def make_plan(grid: Grid, runs: list, experiment: Path, devices_per_run: int | None) -> Plan:
    """Resolve the config of every run with work left and write it into its folder (not in a dry run)."""
    from regablate.sweep.resolve import resolve_config

    plan = Plan()
    for run in runs:
        run_dir = experiment / run.name
        job = RunJob(run, run_dir, run_dir / CONFIG_FILE, grid.stages)
        if not job.pending_stages():
            plan.complete.append(job)
            continue
        overrides = {
            **run.overrides,
            "trainer.logger.init_args.save_dir": str(experiment.parent),
            "trainer.logger.init_args.name": grid.name,
            "trainer.logger.init_args.version": run.name,
        }
        if devices_per_run:
            overrides["trainer.devices"] = devices_per_run
        try:
            plan.resolved[run.name] = resolve_config(grid.base, overrides)
        except RegablateError as err:
            plan.invalid.append((job, str(err)))
            continue
        plan.jobs.append(job)
    return plan


def write_configs(plan: Plan) -> None:
    """Each run's resolved config goes into its folder before anything runs."""
    for job in plan.jobs:
        write_text_atomic(job.config, plan.resolved[job.run.name])


def record_invalid(job: RunJob, message: str) -> None:
    """A run whose config does not resolve fails at its first stage, with the reason in its log."""
    stage = job.pending_stages()[0].name
    mark_running(job.run_dir, stage, job.run.axes)
    with (job.run_dir / LOG_FILE).open("a") as log:
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} invalid config: {message}\n")
    mark_finished(job.run_dir, stage, 2, 0.0)


def print_plan(grid: Grid, plan: Plan, experiment: Path, max_parallel: int, devices: int | None, launcher: str) -> None:
    total = len(plan.jobs) + len(plan.complete) + len(plan.invalid)
    print(f"grid {grid.name} ({grid.path}): {total} runs -> {experiment}/")
    print(f"axes: {'; '.join(f'{k}={list(v)}' for k, v in grid.axes.items())}")
    print(f"stages: {' -> '.join(s.name for s in grid.stages)}; launcher {launcher}, max {max_parallel} at once, devices per run {devices or 'from the config'}")
    for job in plan.complete:
        print(f"  {job.run.name}: complete")
    for job, message in plan.invalid:
        print(f"  {job.run.name}: INVALID: {message}")
    for job in plan.jobs:
        stages = job.pending_stages()
        state = "resume" if len(stages) < len(grid.stages) or (job.run_dir / "checkpoints").is_dir() else "new"
        print(f"  {job.run.name}: {state}, {' -> '.join(s.name for s in stages)}")
        print(f"    $ {' '.join(_short_command(job, stages[0]))}")


class Progress:
    """Runs done out of the total, the current runs, and an ETA from the runs finished so far."""

    def __init__(self, total: int, done: int) -> None:
        self.total, self.done = total, done
        self.failed: list[str] = []
        self.started = time.perf_counter()
        self.run_started: dict[str, float] = {}
        self.durations: list[float] = []
        self.running: set[str] = set()

    def on_event(self, event: str, job: RunJob, detail: Any) -> None:
        name = job.run.name
        if event == "start":
            self.run_started.setdefault(name, time.perf_counter())
            self.running.add(name)
            print(f"[{self.done}/{self.total}] {name}: {getattr(detail, 'name', detail)} ... log {job.run_dir / LOG_FILE}{self._eta()}", flush=True)
            return
        self.done += 1
        self.running.discard(name)
        if name in self.run_started:
            self.durations.append(time.perf_counter() - self.run_started.pop(name))
        if not detail:
            self.failed.append(name)
        outcome = "complete" if detail else f"FAILED (see {job.run_dir / LOG_FILE})"
        print(f"[{self.done}/{self.total}] {name}: {outcome}{self._eta()}", flush=True)

    def _eta(self) -> str:
        left = self.total - self.done
        if not left or not self.durations:
            return ""
        parallel = max(1, len(self.running))
        return f" | ETA {_duration(statistics.fmean(self.durations) * left / parallel)}"


def _short_command(job: RunJob, stage: Stage) -> list[str]:
    command = stage_command(job, stage)
    return ["regablate", *command[3:]]


def _filters(only: list[str]) -> dict[str, str]:
    filters = {}
    for item in only:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RegablateError(f"--only takes KEY=VALUE (e.g. num_registers=4), got {item!r}")
        filters[key.strip()] = value.strip()
    return filters


def _num_gpus(devices_per_run: int | None) -> int:
    if not devices_per_run:
        return 0
    import torch

    return torch.cuda.device_count()


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
