"""``regablate sweep GRID.yaml``: run every point of a register-count grid, then write its report.

    regablate sweep configs/fig8/cpu.yaml                       # the whole CPU grid, then the report
    regablate sweep configs/fig8/cpu.yaml --dry_run true        # the plan, and each stage's data checked
    regablate sweep configs/fig8/cpu.yaml --only num_registers=4 --only seed_everything=0
    regablate sweep configs/fig8/paper.yaml --devices_per_run 8 --launcher slurm
    regablate sweep configs/fig8/paper.yaml --launcher slurm --nodes_per_run 2   # 2 nodes x 8 GPUs per run
    regablate sweep configs/fig8/paper.yaml --status true       # queued / running / finished / failed, ETA

A sweep is plan -> preflight -> launch -> report. The plan resolves and checks every run's config
(``sweep.plan``: a run that does not parse stops the sweep before anything is written); the
preflight checks every stage's data from metadata (``sweep.preflight``) and refuses a grid whose
later stage could not load its data; the launcher runs the runs in waves (a run after the runs
it needs); the report is written at the end. The local launcher forks each stage from one parent
that imported torch, Lightning, timm and regablate once (``regablate.sweep.preload``; ``--preload
false``: a new ``python -m regablate`` process per stage). This module imports planning, preflight
and report code where the sweep reaches them, so ``--help`` and the refusals of the command line
come without importing torch.

Runs land in ``<output>/<grid name>/<run>/``. Finished stages are never re-run, an interrupted
run resumes from ``last.ckpt``, a failed run is recorded and the others go on; the command
exits non-zero at the end when any run failed. Run the same command again to finish a grid.
On Slurm each run is one job of ``nodes_per_run x devices_per_run`` tasks whose fit is one DDP
world, and a job near its time limit saves and requeues itself (``regablate.sweep.slurm``).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ArgumentParser
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt

from regablate.commands import Renamed, function_arguments, modernise, tool_parser
from regablate.errors import RegablateError
from regablate.progress import Progress, duration
from regablate.runs import write_text_atomic
from regablate.sweep.grid import DEFAULT_SIGNAL_DELAY_S, Grid, Launcher, PlannedRun, Stage, load_grid, with_needs
from regablate.sweep.launch import LocalLauncher, RunJob, device_slots, stage_command
from regablate.sweep.plan import Plan, make_plan
from regablate.sweep.preflight import StageReport, refusal
from regablate.sweep.preflight import preflight as check_stages
from regablate.sweep.preload import Preloaded
from regablate.sweep.slurm import JobShape, SlurmLauncher
from regablate.sweep.state import LOG_FILE, mark_finished, mark_running
from regablate.sweep.status import collect, format_status

LauncherKind = Literal["local", "slurm"]
RENAMED = (
    Renamed("--dry-run", "--dry_run", "true"),
    Renamed("--no-report", "--report", "false"),
    Renamed("--max-parallel", "--max_parallel"),
    Renamed("--devices-per-run", "--devices_per_run"),
)
# The launcher settings each launcher uses; a command-line flag of another launcher's is refused.
APPLIES = {
    "local": ("max_parallel", "devices_per_run", "preload"),
    "slurm": ("max_parallel", "devices_per_run", "nodes_per_run", "max_requeues"),
}


def sweep(
    grid: str,
    output: str = "runs",
    only: list[str] | None = None,
    launcher: LauncherKind = "local",
    max_parallel: PositiveInt | None = None,
    devices_per_run: PositiveInt | None = None,
    nodes_per_run: PositiveInt | None = None,
    max_requeues: NonNegativeInt | None = None,
    preload: bool | None = None,
    dry_run: bool = False,
    report: bool = True,
    preflight: bool = True,
    status: bool = False,
    gpu_memory_gb: PositiveFloat | None = None,
) -> None:
    """Run a register-count grid (see configs/fig8/): every run, its probes, then the Figure 8 report.

    Args:
        grid: grid file, e.g. configs/fig8/cpu.yaml.
        output: runs folder; the grid writes <output>/<grid name>/.
        only: keep runs whose axis KEY=VALUE (repeatable; KEY may be the last part, e.g. num_registers=4).
        launcher: local processes, or Slurm jobs through submitit.
        max_parallel: runs at once (default: the grid's launcher.max_parallel).
        devices_per_run: devices of each run (sets trainer.devices; GPUs are packed per run; on Slurm: tasks per node).
        nodes_per_run: Slurm only: nodes of each run (sets trainer.num_nodes; default: the grid's).
        max_requeues: Slurm only: requeues of a job stopped at its time limit (default: the grid's).
        preload: local only: fork each stage from a parent that imported torch, Lightning, timm and regablate
            once (default true; false: each stage a new python -m regablate process).
        dry_run: print the plan and the preflight, run nothing.
        report: write the report when the runs end.
        preflight: check every stage's data (metadata only) first; refuse to start if one cannot load.
        status: print each run's state (queued, running, finished, failed) and an ETA, run nothing.
        gpu_memory_gb: memory of one GPU in GiB: refuse the grid, before anything runs, when a run's
            estimated peak per device (``regablate fit --print_memory true``) exceeds it.
    """
    flags = {"max_parallel": max_parallel, "devices_per_run": devices_per_run}
    flags |= {"nodes_per_run": nodes_per_run, "max_requeues": max_requeues}
    refuse_other_launchers_flags(launcher, {**flags, "preload": preload})
    loaded = load_grid(grid)
    settings = launcher_settings(loaded.launcher, launcher, flags)
    runs = selected_runs(loaded, only or [])
    experiment = Path(output) / loaded.name
    if status:
        print(format_status(loaded, experiment, collect(loaded, runs, experiment), settings.max_parallel), flush=True)
        return
    preloaded = Preloaded() if launcher == "local" and preload is not False and not dry_run else None
    if preloaded is not None:
        preloaded.warm_up()  # its imports run while this process plans
    shape = JobShape(settings.nodes_per_run, settings.devices_per_run or 1) if launcher == "slurm" else None
    plan = make_plan(loaded, runs, experiment, settings.devices_per_run, shape)
    if gpu_memory_gb is not None:
        print(check_memory(plan, gpu_memory_gb), flush=True)
    started = time.perf_counter()
    reports = check_stages(loaded, plan.resolved, pending_stages(plan)) if preflight else []
    seconds = time.perf_counter() - started
    events = RunEvents(plan.total, complete=len(plan.complete))
    chosen = slurm_launcher(experiment, settings, shape, plan, events, dry_run)
    if dry_run:
        print_plan(loaded, plan, experiment, settings, launcher)
        if shape is not None:
            print(slurm_plan(shape, settings, checked=chosen is not None))
    refused = refusal(reports)
    if dry_run or refused is not None:
        print_preflight(reports, seconds)
    if refused is not None:
        raise refused
    if dry_run:
        return
    launch(chosen or LocalLauncher(local_slots(settings), events, preloaded), plan, events, loaded.name, experiment)
    if report and loaded.report.enabled:
        from regablate.report.command import write_report

        paths = write_report(experiment, loaded.report)
        print(f"report: {', '.join(str(p) for p in paths)}", flush=True)
    conclude(events, loaded.name, experiment)


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


def check_memory(plan: Plan, budget_gib: float) -> str:
    """A line saying every run's estimated peak GPU memory fits ``budget_gib``; refuses the first that does not."""
    from regablate.memory import GIB, estimate

    largest = ("", 0)
    for name, text in plan.resolved.items():
        config = yaml.safe_load(text)
        total = estimate(config).total
        if total > budget_gib * GIB:
            checkpointing = config.get("model", {}).get("init_args", {}).get("grad_checkpointing", False)
            remedy = "a smaller batch_size" + ("" if checkpointing else ", or model.init_args.grad_checkpointing: true")
            raise RegablateError(
                f"run {name}: estimated peak GPU memory {total / GIB:.1f} GiB per device exceeds --gpu_memory_gb "
                f"{budget_gib:g} (see regablate fit --config RUN_CONFIG --print_memory true; {remedy})"
            )
        largest = max(largest, (name, total), key=lambda item: item[1])
    name, total = largest
    fits = f"memory: every run's estimated peak fits {budget_gib:g} GiB per device"
    return f"{fits} (largest: {name}, {total / GIB:.1f} GiB)"


def refuse_other_launchers_flags(launcher: LauncherKind, flags: dict[str, Any]) -> None:
    """A launcher setting given on the command line that ``launcher`` does not use is refused, naming those it does."""
    for name, value in flags.items():
        if value is not None and name not in APPLIES[launcher]:
            other = next(kind for kind, names in APPLIES.items() if name in names)
            shown = str(value).lower() if isinstance(value, bool) else value
            how = "runs each run on this machine" if launcher == "local" else "runs each stage as a process of its job"
            raise RegablateError(
                f"--{name} {shown} needs --launcher {other}: a {launcher} sweep {how}; "
                f"its settings: {', '.join('--' + key for key in APPLIES[launcher])}"
            )


def launcher_settings(grid: Launcher, launcher: LauncherKind, flags: dict[str, Any]) -> Launcher:
    """The grid's launcher settings with the command line's flags over them."""
    settings = dataclasses.replace(grid, **{name: value for name, value in flags.items() if value is not None})
    if settings.nodes_per_run > 1 and launcher != "slurm":
        raise RegablateError(
            f"the grid's launcher.nodes_per_run {settings.nodes_per_run} needs --launcher slurm: "
            "a local sweep runs each run on this machine"
        )
    return settings


def selected_runs(grid: Grid, only: list[str]) -> list[PlannedRun]:
    """The runs ``--only`` keeps, with every run they need (a run continued from another brings that one along)."""
    filters = {}
    for item in only:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RegablateError(f"--only takes KEY=VALUE (e.g. num_registers=4), got {item!r}")
        filters[key.strip()] = value.strip()
    runs = [run for run in grid.runs if run.matches(filters)]
    if not runs:
        raise RegablateError(f"--only {' '.join(only)} matches no run of {grid.path}; axes: {', '.join(grid.axes)}")
    return with_needs(runs, grid.runs)


def pending_stages(plan: Plan) -> dict[str, list[Stage]]:
    return {job.run.name: job.pending_stages() for job in plan.jobs}


def uses_gpus(plan: Plan) -> bool:
    """Whether any run may use GPUs (not all on ``trainer.accelerator: cpu``): its Slurm job then asks for them."""
    accelerators = {
        str((yaml.safe_load(text).get("trainer") or {}).get("accelerator")) for text in plan.resolved.values()
    }
    return accelerators != {"cpu"}


def slurm_launcher(
    experiment: Path, settings: Launcher, shape: JobShape | None, plan: Plan, events: RunEvents, dry_run: bool
) -> SlurmLauncher | None:
    """The Slurm launcher, checked with Slurm itself before anything is written or submitted; None for a local
    sweep, a plan with nothing to run, or a dry run where there is no sbatch."""
    if shape is None or not plan.jobs or (dry_run and shutil.which("sbatch") is None):
        return None
    gpus = bool(settings.devices_per_run) and uses_gpus(plan)
    chosen = SlurmLauncher(experiment / "slurm", settings, shape=shape, gpus=gpus, on_event=events)
    chosen.check()
    return chosen


def local_slots(settings: Launcher) -> list[str | None]:
    return device_slots(settings.max_parallel, settings.devices_per_run, _num_gpus(settings.devices_per_run))


def launch(launcher: LocalLauncher | SlurmLauncher, plan: Plan, events: RunEvents, name: str, experiment: Path) -> None:
    """Write each run's resolved config into its folder, then run the plan's jobs in waves."""
    for job in plan.jobs:
        write_text_atomic(job.config, plan.resolved[job.run.name])
    left = f"{len(plan.complete)} already complete, {len(plan.jobs)} to run"
    print(f"sweep {name}: {plan.total} runs, {left} -> {experiment}/", flush=True)
    run_after_needs(launcher, plan, events)


def run_after_needs(launcher: LocalLauncher | SlurmLauncher, plan: Plan, events: RunEvents) -> None:
    """Launch the plan's jobs in waves: a run starts once every run it needs is complete.

    A run whose needed run failed fails without starting, naming it.
    """
    complete = {job.run.name for job in plan.complete}
    failed: set[str] = set()
    waiting = list(plan.jobs)
    while waiting:
        blocked = [job for job in waiting if set(job.run.needs) & failed]
        for job in blocked:
            names = ", ".join(sorted(set(job.run.needs) & failed))
            record_failure(job, f"it needs run {names}, which failed: fix that run and sweep again")
            events("done", job, False)
            failed.add(job.run.name)
        ready = [job for job in waiting if set(job.run.needs) <= complete]
        waiting = [job for job in waiting if job not in ready and job not in blocked]
        if ready:
            results = launcher.run(ready)
            for job in ready:  # a run the launcher gave no result for counts as failed
                (complete if results.get(job.run.name) else failed).add(job.run.name)


def record_failure(job: RunJob, message: str) -> None:
    """Fail a run at its first pending stage without starting it; the reason goes into its log and summary."""
    stage = job.pending_stages()[0].name
    mark_running(job.run_dir, stage, job.run.axes)
    with (job.run_dir / LOG_FILE).open("a") as log:
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
    mark_finished(job.run_dir, stage, None, 0.0, reason=message)


def conclude(events: RunEvents, name: str, experiment: Path) -> None:
    """The sweep's last line, or the one-line error naming the runs that failed and their logs."""
    seconds = events.progress.finish()
    if events.failed:
        logs = ", ".join(str(experiment / run / LOG_FILE) for run in events.failed)
        raise RegablateError(
            f"{len(events.failed)} of {events.progress.total} runs failed: {', '.join(events.failed)} (logs: {logs}); "
            "run the same command again to retry them"
        )
    print(f"sweep {name}: all {events.progress.total} runs complete in {duration(seconds)}", flush=True)


class RunEvents:
    """The launchers' events as one line each: ``[3/22] r4_s1: complete, ETA 5 min 10 s``.

    ``regablate.progress.Progress`` counts the runs (those complete before the sweep started
    included) and gives the ETA from the rate of the runs finished since; the sweep prints its own
    lines, so the Progress prints none.
    """

    def __init__(self, total: int, complete: int) -> None:
        self.progress = Progress("sweep", total, unit="runs", initial=complete, enabled=False)
        self.failed: list[str] = []

    def __call__(self, event: str, job: RunJob, detail: Any) -> None:
        """``("start", job, stage or text)``, ``("done", job, ok)`` or ``("requeued", job, count)``."""
        progress = self.progress
        if event == "requeued":
            what = f"requeued at its time limit ({detail}x so far)"
        elif event == "start":
            what = f"{getattr(detail, 'name', detail)} ... log {job.run_dir / LOG_FILE}{progress.eta_text()}"
        else:
            progress.update()
            if not detail:
                self.failed.append(job.run.name)
            outcome = "complete" if detail else f"FAILED (see {job.run_dir / LOG_FILE})"
            what = f"{outcome}{progress.eta_text()}"
        print(f"[{progress.done}/{progress.total}] {job.run.name}: {what}", flush=True)


def print_preflight(reports: list[StageReport], seconds: float) -> None:
    """One line per stage: what the preflight could and could not check."""
    if reports:
        print(f"preflight: each stage's data, from metadata (no image read) in {seconds:.2f} s")
        for report in reports:
            print(report.line())


def slurm_plan(shape: JobShape, settings: Launcher, checked: bool) -> str:
    """The dry run's account of the Slurm jobs it would submit."""
    delay = settings.slurm.get("slurm_signal_delay_s", DEFAULT_SIGNAL_DELAY_S)
    check = "sbatch --test-only accepts one run's job" if checked else "not checked: sbatch not found here"
    return (
        f"slurm: each run one job of {shape.describe()} (one per device; the fit is one DDP world across them), "
        f"a job array {settings.max_parallel} at once; SIGUSR1 {delay} s before the time limit saves and requeues "
        f"a job, at most {settings.max_requeues} times; {check}"
    )


def print_plan(grid: Grid, plan: Plan, experiment: Path, settings: Launcher, launcher: LauncherKind) -> None:
    print(f"grid {grid.name} ({grid.path}): {plan.total} runs -> {experiment}/")
    print(f"axes: {'; '.join(f'{k}={list(v)}' for k, v in grid.axes.items())}")
    print(
        f"stages: {' -> '.join(s.name for s in grid.stages)}; launcher {launcher}, max {settings.max_parallel} at "
        f"once, devices per run {settings.devices_per_run or 'from the config'}"
    )
    for job in plan.complete:
        print(f"  {job.run.name}: complete")
    for job in plan.jobs:
        stages = job.pending_stages()
        state = "resume" if len(stages) < len(job.stages) or (job.run_dir / "checkpoints").is_dir() else "new"
        after = f", after {', '.join(job.run.needs)}" if job.run.needs else ""
        print(f"  {job.run.name}: {state}{after}, {' -> '.join(s.name for s in stages)}")
        print(f"    $ regablate {' '.join(stage_command(job, stages[0])[3:])}")


def _num_gpus(devices_per_run: int | None) -> int:
    if not devices_per_run:
        return 0
    import torch

    return torch.cuda.device_count()
