"""``regablate sweep GRID.yaml``: run every point of a register-count grid, then write its report.

    regablate sweep configs/fig8/cpu.yaml                       # the whole CPU grid, then the report
    regablate sweep configs/fig8/cpu.yaml --dry_run true        # the plan, and each stage's data checked
    regablate sweep configs/fig8/cpu.yaml --only num_registers=4 --only seed_everything=0
    regablate sweep configs/fig8/paper.yaml --devices_per_run 8 --launcher slurm
    regablate sweep configs/fig8/paper.yaml --launcher slurm --nodes_per_run 2   # 2 nodes x 8 GPUs per run
    regablate sweep configs/fig8/paper.yaml --status true       # queued / running / finished / failed, ETA

Runs land in ``<output>/<grid name>/<run>/``. Finished stages are never re-run, an interrupted
run resumes from ``last.ckpt``, a failed run is recorded and the others go on; the command
exits non-zero at the end when any run failed. Run the same command again to finish a grid.
Before anything runs, a preflight checks every stage's data from metadata (``sweep.preflight``)
and refuses to start a grid whose later stage could not load its data.
On Slurm each run is one job of ``nodes_per_run x devices_per_run`` tasks whose fit is one DDP
world, and a job near its time limit saves and requeues itself (``regablate.sweep.slurm``).
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ArgumentParser
from jsonargparse.typing import PositiveInt

from regablate.commands import Renamed, function_arguments, modernise, tool_parser
from regablate.errors import RegablateError
from regablate.report.command import write_report
from regablate.runs import write_text_atomic
from regablate.sweep.grid import EXPERIMENT, Grid, Stage, load_grid, with_needs
from regablate.sweep.launch import LocalLauncher, RunJob, device_slots, stage_command
from regablate.sweep.preflight import StageReport, refusal
from regablate.sweep.preflight import preflight as check_stages
from regablate.sweep.resolve import resolve_config
from regablate.sweep.slurm import DEFAULT_MAX_REQUEUES, DEFAULT_SIGNAL_DELAY_S, JobShape, SlurmLauncher
from regablate.sweep.state import CONFIG_FILE, LOG_FILE, mark_finished, mark_running
from regablate.sweep.status import collect, format_status

RENAMED = (
    Renamed("--dry-run", "--dry_run", "true"),
    Renamed("--no-report", "--report", "false"),
    Renamed("--max-parallel", "--max_parallel"),
    Renamed("--devices-per-run", "--devices_per_run"),
)


def sweep(
    grid: str,
    output: str = "runs",
    only: list[str] | None = None,
    max_parallel: PositiveInt | None = None,
    devices_per_run: PositiveInt | None = None,
    nodes_per_run: PositiveInt | None = None,
    launcher: Literal["local", "slurm"] = "local",
    dry_run: bool = False,
    report: bool = True,
    preflight: bool = True,
    status: bool = False,
) -> None:
    """Run a register-count grid (see configs/fig8/): every run, its probes, then the Figure 8 report.

    Args:
        grid: grid file, e.g. configs/fig8/cpu.yaml.
        output: runs folder; the grid writes <output>/<grid name>/.
        only: keep runs whose axis KEY=VALUE (repeatable; KEY may be the last part, e.g. num_registers=4).
        max_parallel: runs at once (default: the grid's, else 1).
        devices_per_run: devices of each run (sets trainer.devices; GPUs are packed per run; on Slurm: tasks per node).
        nodes_per_run: nodes of each run on Slurm (sets trainer.num_nodes; default: the grid's, else 1).
        launcher: local processes, or Slurm jobs through submitit.
        dry_run: print the plan and the preflight, run nothing.
        report: write the report when the runs end.
        preflight: check every stage's data (metadata only) first; refuse to start if one cannot load.
        status: print each run's state (queued, running, finished, failed) and an ETA, run nothing.
    """
    only = list(only or [])
    loaded = load_grid(grid)
    runs = [run for run in loaded.runs if run.matches(_filters(only))]
    if not runs:
        raise RegablateError(f"--only {' '.join(only)} matches no run of {grid}; axes: {', '.join(loaded.axes)}")
    runs = with_needs(runs, loaded.runs)  # a run continued from another brings that one along
    max_parallel = max_parallel or loaded.launcher.get("max_parallel") or 1
    devices_per_run = devices_per_run or loaded.launcher.get("devices_per_run")
    nodes_per_run = nodes_per_run or loaded.launcher.get("nodes_per_run") or 1
    experiment = Path(output) / loaded.name
    if status:
        print(format_status(loaded, experiment, collect(loaded, runs, experiment), max_parallel), flush=True)
        return
    if nodes_per_run > 1 and launcher != "slurm":
        raise RegablateError(
            f"nodes_per_run {nodes_per_run} needs --launcher slurm: a local sweep runs each run on this machine"
        )
    shape = job_shape(launcher, nodes_per_run, devices_per_run)
    plan = make_plan(loaded, runs, experiment, devices_per_run, shape)
    started = time.perf_counter()
    pending = {job.run.name: job.pending_stages() for job in plan.jobs}
    reports = check_stages(loaded, plan.resolved, pending) if preflight else []
    seconds = time.perf_counter() - started
    progress = Progress(total=len(plan.jobs) + len(plan.complete) + len(plan.invalid), done=len(plan.complete))
    chosen: LocalLauncher | SlurmLauncher | None = None
    if shape is not None and plan.jobs and not (dry_run and shutil.which("sbatch") is None):
        chosen = SlurmLauncher(
            experiment / "slurm",
            loaded.launcher.get("slurm") or {},
            shape=shape,
            max_parallel=max_parallel,
            max_requeues=int(loaded.launcher.get("max_requeues", DEFAULT_MAX_REQUEUES)),
            gpus=bool(devices_per_run) and uses_gpus(plan),
            on_event=progress.on_event,
        )
        chosen.check()  # a job Slurm would never run is refused before anything is written or submitted
    if dry_run:
        print_plan(loaded, plan, experiment, max_parallel, devices_per_run, launcher)
        if shape is not None:
            print(slurm_plan(shape, max_parallel, loaded, checked=chosen is not None))
    refused = refusal(reports)
    if dry_run or refused is not None:
        print_preflight(reports, seconds)
    if refused is not None:
        raise refused
    if dry_run:
        return
    write_configs(plan)
    for job, message in plan.invalid:
        record_invalid(job, message)
        progress.on_event("done", job, False)
    print(
        f"sweep {loaded.name}: {progress.total} runs, {len(plan.complete)} already complete, "
        f"{len(plan.jobs)} to run -> {experiment}/",
        flush=True,
    )
    if chosen is None:
        chosen = LocalLauncher(
            device_slots(max_parallel, devices_per_run, _num_gpus(devices_per_run)), progress.on_event
        )
    run_after_needs(chosen, plan, progress)
    if report and loaded.report.get("enabled", True):
        paths = write_report(experiment, grid=loaded)
        print(f"report: {', '.join(str(p) for p in paths)}", flush=True)
    if progress.failed:
        logs = ", ".join(str(experiment / name / LOG_FILE) for name in progress.failed)
        raise RegablateError(
            f"{len(progress.failed)} of {progress.total} runs failed: {', '.join(progress.failed)} (logs: {logs}); "
            "run the same command again to retry them"
        )
    print(
        f"sweep {loaded.name}: all {progress.total} runs complete "
        f"in {_duration(time.perf_counter() - progress.started)}",
        flush=True,
    )


def build_parser() -> ArgumentParser:
    parser = tool_parser(
        "sweep", "Run a register-count grid (see configs/fig8/): every run, its probes, then the Figure 8 report."
    )
    parser.add_function_arguments(sweep, as_positional=True)
    return parser


def main(argv: list[str]) -> None:
    """Entry point of ``regablate sweep`` (errors surface as RegablateError / ArgumentError)."""
    cfg = build_parser().parse_args(modernise(argv, "sweep", RENAMED, repeatable=("--only",)))
    sweep(**function_arguments(cfg))


@dataclass
class Plan:
    """The grid's runs sorted by what is left: ``jobs`` to run, ``complete`` ones, and ``invalid`` configs."""

    jobs: list[RunJob] = field(default_factory=list)
    resolved: dict[str, str] = field(default_factory=dict)  # run name -> its resolved config (YAML)
    complete: list[RunJob] = field(default_factory=list)
    invalid: list[tuple[RunJob, str]] = field(default_factory=list)


def job_shape(launcher: str, nodes_per_run: int, devices_per_run: int | None) -> JobShape | None:
    """A Slurm run's job: one task per device on each node; None for a local sweep (its runs start their own ranks)."""
    if launcher != "slurm":
        return None
    return JobShape(nodes=nodes_per_run, tasks_per_node=devices_per_run or 1)


def uses_gpus(plan: Plan) -> bool:
    """Whether any run may use GPUs (not all on ``trainer.accelerator: cpu``): its Slurm job then asks for them."""
    accelerators = {
        str((yaml.safe_load(text).get("trainer") or {}).get("accelerator")) for text in plan.resolved.values()
    }
    return accelerators != {"cpu"}


def make_plan(
    grid: Grid, runs: list, experiment: Path, devices_per_run: int | None, shape: JobShape | None = None
) -> Plan:
    """Resolve the config of every run with work left and write it into its folder (not in a dry run).

    A Slurm job of several tasks fits one DDP world across them: its runs get ``trainer.devices``
    (tasks per node) and ``trainer.num_nodes`` of the job's shape.
    """
    plan = Plan()
    for run in runs:
        run_dir = experiment / run.name
        job = RunJob(run, run_dir, run_dir / CONFIG_FILE, grid.stages_of(run))
        if not job.pending_stages():
            plan.complete.append(job)
            continue
        overrides = {
            **{key: _in_experiment(value, experiment) for key, value in run.overrides.items()},
            "trainer.logger.init_args.save_dir": str(experiment.parent),
            "trainer.logger.init_args.name": grid.name,
            "trainer.logger.init_args.version": run.name,
        }
        if devices_per_run:
            overrides["trainer.devices"] = devices_per_run
        if shape is not None and shape.tasks > 1:
            overrides["trainer.devices"] = shape.tasks_per_node
            overrides["trainer.num_nodes"] = shape.nodes
        try:
            plan.resolved[run.name] = resolve_config(grid.base_of(run), overrides)
        except RegablateError as err:
            plan.invalid.append((job, str(err)))
            continue
        plan.jobs.append(job)
    return plan


def _in_experiment(value: Any, experiment: Path) -> Any:
    return value.replace("{" + EXPERIMENT + "}", str(experiment)) if isinstance(value, str) else value


def run_after_needs(launcher: LocalLauncher | SlurmLauncher, plan: Plan, progress: Progress) -> None:
    """Launch the plan's jobs in waves: a run starts once every run it needs is complete.

    A run whose needed run failed (or could not be planned) fails without starting, naming it.
    """
    complete = {job.run.name for job in plan.complete}
    failed = {job.run.name for job, _ in plan.invalid}
    waiting = list(plan.jobs)
    while waiting:
        blocked = [job for job in waiting if set(job.run.needs) & failed]
        for job in blocked:
            names = ", ".join(sorted(set(job.run.needs) & failed))
            record_failure(job, f"it needs run {names}, which failed: fix that run and sweep again")
            progress.on_event("done", job, False)
            failed.add(job.run.name)
        ready = [job for job in waiting if set(job.run.needs) <= complete]
        waiting = [job for job in waiting if job not in ready and job not in blocked]
        if ready:
            results = launcher.run(ready)
            for job in ready:  # a run the launcher gave no result for counts as failed
                (complete if results.get(job.run.name) else failed).add(job.run.name)


def print_preflight(reports: list[StageReport], seconds: float) -> None:
    """One line per stage: what the preflight could and could not check."""
    if reports:
        print(f"preflight: each stage's data, from metadata (no image read) in {seconds:.2f} s")
        for report in reports:
            print(report.line())


def write_configs(plan: Plan) -> None:
    """Each run's resolved config goes into its folder before anything runs."""
    for job in plan.jobs:
        write_text_atomic(job.config, plan.resolved[job.run.name])


def record_invalid(job: RunJob, message: str) -> None:
    """A run whose config does not resolve fails at its first stage, with the reason in its log."""
    record_failure(job, f"invalid config: {message}", exit_code=2)


def record_failure(job: RunJob, message: str, exit_code: int | None = None) -> None:
    """Fail a run at its first pending stage without starting it; the reason goes into its log and summary."""
    stage = job.pending_stages()[0].name
    mark_running(job.run_dir, stage, job.run.axes)
    with (job.run_dir / LOG_FILE).open("a") as log:
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
    mark_finished(job.run_dir, stage, exit_code, 0.0, reason=None if exit_code is not None else message)


def slurm_plan(shape: JobShape, max_parallel: int, grid: Grid, checked: bool) -> str:
    """The dry run's account of the Slurm jobs it would submit."""
    settings = grid.launcher.get("slurm") or {}
    delay = settings.get("slurm_signal_delay_s", DEFAULT_SIGNAL_DELAY_S)
    requeues = grid.launcher.get("max_requeues", DEFAULT_MAX_REQUEUES)
    check = "sbatch --test-only accepts one run's job" if checked else "not checked: sbatch not found here"
    return (
        f"slurm: each run one job of {shape.describe()} (one per device; the fit is one DDP world across them), "
        f"a job array {max_parallel} at once; SIGUSR1 {delay} s before the time limit saves and requeues a job, "
        f"at most {requeues} times; {check}"
    )


def print_plan(grid: Grid, plan: Plan, experiment: Path, max_parallel: int, devices: int | None, launcher: str) -> None:
    total = len(plan.jobs) + len(plan.complete) + len(plan.invalid)
    print(f"grid {grid.name} ({grid.path}): {total} runs -> {experiment}/")
    print(f"axes: {'; '.join(f'{k}={list(v)}' for k, v in grid.axes.items())}")
    print(
        f"stages: {' -> '.join(s.name for s in grid.stages)}; launcher {launcher}, max {max_parallel} at once, "
        f"devices per run {devices or 'from the config'}"
    )
    for job in plan.complete:
        print(f"  {job.run.name}: complete")
    for job, message in plan.invalid:
        print(f"  {job.run.name}: INVALID: {message}")
    for job in plan.jobs:
        stages = job.pending_stages()
        state = "resume" if len(stages) < len(job.stages) or (job.run_dir / "checkpoints").is_dir() else "new"
        after = f", after {', '.join(job.run.needs)}" if job.run.needs else ""
        print(f"  {job.run.name}: {state}{after}, {' -> '.join(s.name for s in stages)}")
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
        if event == "requeued":
            print(f"[{self.done}/{self.total}] {name}: requeued at its time limit ({detail}x so far)", flush=True)
            return
        if event == "start":
            self.run_started.setdefault(name, time.perf_counter())
            self.running.add(name)
            print(
                f"[{self.done}/{self.total}] {name}: {getattr(detail, 'name', detail)} "
                f"... log {job.run_dir / LOG_FILE}{self._eta()}",
                flush=True,
            )
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
