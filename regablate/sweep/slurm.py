"""A grid's runs as Slurm jobs (submitit): a job array, one task per device, requeue at the time limit.

The runs are one job array, ``max_parallel`` of them running at once. Each run's job has
``nodes_per_run x devices_per_run`` tasks, one per device, started by ``srun``; every task runs
``SlurmRun`` (the function submitit pickles):

* the fit is one DDP world across the tasks: each task starts ``python -m regablate fit`` with the
  Slurm environment in place, and Lightning's ``SLURMEnvironment`` takes ``SLURM_PROCID`` and
  ``SLURM_NTASKS`` as rank and world size (the sweep sets ``trainer.devices`` and
  ``trainer.num_nodes`` to the job's shape when it resolves the config);
* every other stage runs once, on task 0, as on a workstation (the Slurm world hidden from it, a
  Lightning stage on ``--trainer.num_nodes 1``); the other tasks exit when the fit ends;
* only task 0 writes the run's state (``summary.json``, ``sweep.log``); task k logs its share of
  the fit to ``sweep.rank<k>.log``.

Time limits: the job asks Slurm for SIGUSR1 ``slurm_signal_delay_s`` seconds before its limit
(``--signal=USR1@N``, with ``--requeue``). Slurm signals every process of the job's tasks. The fit
saves ``last.ckpt`` at its next step on every rank and exits 3 (``TimeLimitCheckpoint``); task 0
records the requeue in the run's summary and runs ``scontrol requeue``; the requeued job runs the
same function again, which skips finished stages and resumes the fit from ``last.ckpt``. Another
stage caught by the signal (a probe) is cut short and re-run after the requeue. When a job has
been requeued ``max_requeues`` times, the stage fails instead and its summary says why.

Why Lightning rather than submitit's ``Checkpointable`` for the requeue: ``checkpoint()`` runs in
the submitit task process, on task 0 only, while the training state lives in the fit processes
of every task; the signal has to be acted on there, at a step that all ranks agree on.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regablate.errors import EXIT_TIME_LIMIT, RegablateError
from regablate.runs import RunRecord, first_line, write_json_atomic
from regablate.sweep.grid import DEFAULT_SIGNAL_DELAY_S, LIGHTNING_COMMANDS, Launcher
from regablate.sweep.launch import RunJob, StageProcess, stage_env
from regablate.sweep.state import (
    LOG_FILE,
    REQUEUED,
    RUNNING,
    is_complete,
    mark_finished,
    mark_requeued,
    slurm_job_id,
    stage_key,
)

TIME_LIMIT_SIGNAL = signal.SIGUSR1
JOBS_FILE = "jobs.json"  # <experiment>/slurm/jobs.json: each run's latest Slurm job
POLL_SECONDS = 1.0
SQUEUE_EVERY_S = 10.0
REQUEUE_WAIT_S = 300  # task 0 waits this long for Slurm to stop it after `scontrol requeue`
# Job settings the launcher owns: the shape comes from nodes_per_run / devices_per_run.
SHAPE_SETTINGS = {"nodes": "nodes_per_run", "tasks_per_node": "devices_per_run"}


@dataclass(frozen=True)
class JobShape:
    """Each run's Slurm job: ``nodes`` x ``tasks_per_node`` tasks, one per device."""

    nodes: int = 1
    tasks_per_node: int = 1

    @property
    def tasks(self) -> int:
        return self.nodes * self.tasks_per_node

    def describe(self) -> str:
        return f"{self.nodes} node(s) x {self.tasks_per_node} task(s)"


@contextlib.contextmanager
def noted_signal(signum: int) -> Iterator[Callable[[], bool]]:
    """Note ``signum`` instead of dying of it; yields a function that says whether it came.

    The submitit task process gets the time-limit signal with its stage processes, and SIGUSR1's
    default action would end it (and, through PR_SET_PDEATHSIG, the fit before it saves).
    """
    received: list[bool] = []
    previous = signal.signal(signum, lambda _signum, _frame: received.append(True))
    try:
        yield lambda: bool(received)
    finally:
        signal.signal(signum, previous)


@dataclass
class SlurmRun:
    """What each task of a run's Slurm job runs: its share of the run's unfinished stages."""

    job: RunJob
    shape: JobShape
    max_requeues: int

    def __call__(self) -> bool:
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        with noted_signal(TIME_LIMIT_SIGNAL) as signalled:
            return self.lead(signalled) if rank == 0 else self.follow(rank)

    def spans_tasks(self, command: str) -> bool:
        return command == "fit" and self.shape.tasks > 1

    def follow(self, rank: int) -> bool:
        """Task ``rank`` > 0: a rank of the fit's DDP world, when the fit is still to do; nothing else."""
        stages = self.job.pending_stages()
        if not stages or not self.spans_tasks(stages[0].command):
            return True
        process = StageProcess(
            self.job, stages[0], stage_env(slurm_world=True), log=f"sweep.rank{rank}.log", record=False
        )
        exit_code = process.wait()
        process.close_log(exit_code)
        return exit_code == 0

    def lead(self, signalled: Callable[[], bool]) -> bool:
        """Task 0: every unfinished stage in order, the run's state, and the requeue at the time limit."""
        for stage in self.job.pending_stages():
            spans = self.spans_tasks(stage.command)
            extra: tuple[str, ...] = ()
            if not spans and stage.command in LIGHTNING_COMMANDS and self.shape.nodes > 1:
                extra = ("--trainer.num_nodes", "1")  # run on this node alone, as on a workstation
            process = StageProcess(self.job, stage, stage_env(slurm_world=spans), extra_args=extra)
            exit_code = process.wait()
            if exit_code == EXIT_TIME_LIMIT or (exit_code != 0 and signalled()):
                process.close_log(exit_code, " (time limit)")
                return self.requeue(stage.name, process.seconds, exit_code)
            process.finish(exit_code)
            if exit_code != 0:
                return False
            remaining = self.job.pending_stages()
            if remaining and signalled():
                return self.requeue(remaining[0].name, 0.0, None)
        return True

    def requeue(self, stage: str, seconds: float, exit_code: int | None) -> bool:
        """Put the job back into the queue, unless it has been requeued ``max_requeues`` times already.

        ``exit_code`` is the stage's (``EXIT_TIME_LIMIT`` when the fit saved first), None when the
        signal came between stages and ``stage``, the next one, has not started.
        """
        run_dir = self.job.run_dir
        job_id = slurm_job_id()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts >= self.max_requeues:
            reason = f"time limit reached; slurm job {job_id} was requeued {restarts} times (launcher.max_requeues)"
            _log(run_dir, f"{reason}: not requeued again; run the sweep again to go on from checkpoints/last.ckpt")
            mark_finished(run_dir, stage, exit_code, seconds, reason=reason)
            return False
        requeues = int(RunRecord(run_dir).read().get(f"{stage_key(stage)}/requeues", 0)) + 1
        what = {EXIT_TIME_LIMIT: "saved and requeued", None: "requeued before it started"}.get(
            exit_code, f"stopped (exit {exit_code}) and requeued"
        )
        _log(
            run_dir,
            f"time limit: stage {stage} {what} ({restarts + 1} of at most {self.max_requeues} for slurm job "
            f"{job_id}); it goes on from its last checkpoint",
        )
        mark_requeued(run_dir, stage, requeues, seconds)
        result = subprocess.run(["scontrol", "requeue", str(job_id)], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            message = first_line(RuntimeError((result.stderr or result.stdout).strip() or f"exit {result.returncode}"))
            _log(run_dir, f"scontrol requeue {job_id} failed: {message}")
            mark_finished(run_dir, stage, exit_code, seconds, reason=f"scontrol requeue failed: {message}")
            return False
        # Slurm stops the job now (SIGTERM, which submitit would ignore, then SIGKILL); returning instead would
        # write this task's result and tell the sweep the job has ended. The requeued job runs this function again.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(REQUEUE_WAIT_S)
        return False


def squeue_states(job_ids: list[str]) -> dict[str, str] | None:
    """``{job id: state}`` of the jobs ``squeue`` still lists (array elements one by one), or None without squeue."""
    if not job_ids:
        return {}
    if shutil.which("squeue") is None:
        return None
    command = ["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(job_ids)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return parse_squeue(result.stdout)


def parse_squeue(text: str) -> dict[str, str]:
    """``squeue -h -r -o '%i|%T|%r'`` lines as ``{job id: state}``; pending ones with their reason."""
    states = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0]:
            continue
        state = parts[1]
        reason = parts[2] if len(parts) > 2 else ""
        if state == "PENDING" and reason and reason != "None":
            state = f"PENDING ({reason})"
        states[parts[0]] = state
    return states


def read_jobs(folder: Path) -> dict[str, dict[str, Any]]:
    """``<experiment>/slurm/jobs.json``: each run's latest job, ``{run: {"job_id": ..., "tasks": n}}``."""
    path = folder / JOBS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


class SlurmLauncher:
    """Submit the runs as one job array, ``max_parallel`` at once, and wait for them.

    Before anything is submitted, ``check`` asks Slurm itself (``sbatch --test-only``) whether it
    can ever run one run's job: a partition that does not exist or more nodes, tasks, CPUs, GPUs or
    memory than the cluster has are refused in one line. Runs whose job from an earlier sweep is
    still queued or running are waited for, not submitted twice.

    Only submitit's public API is used: ``AutoExecutor.update_parameters``, ``submit``, ``batch``,
    and ``Executor.parameters`` (the Slurm-side parameters, after submitit's translation).
    """

    def __init__(
        self,
        folder: Path,
        settings: Launcher,
        *,
        shape: JobShape,
        gpus: bool,
        on_event: Callable[[str, RunJob, Any], None],
    ) -> None:
        if shutil.which("sbatch") is None:
            raise RegablateError("--launcher slurm: sbatch not found; run the sweep on a Slurm login node")
        for key, ours in SHAPE_SETTINGS.items():
            if key in settings.slurm:
                raise RegablateError(f"grid launcher.slurm.{key}: set launcher.{ours} (or --{ours}) instead")
        self.folder, self.shape, self.max_requeues, self.on_event = folder, shape, settings.max_requeues, on_event
        extra = dict(settings.slurm.get("slurm_additional_parameters") or {})
        extra.setdefault("signal", f"USR1@{settings.slurm.get('slurm_signal_delay_s', DEFAULT_SIGNAL_DELAY_S)}")
        extra.setdefault("requeue", True)
        self.parameters = {
            **settings.slurm,
            "nodes": shape.nodes,
            "tasks_per_node": shape.tasks_per_node,
            "slurm_additional_parameters": extra,
            "slurm_array_parallelism": settings.max_parallel,
        }
        if gpus and "gpus_per_node" not in settings.slurm:
            self.parameters["gpus_per_node"] = shape.tasks_per_node
        self.executor = self._make_executor(folder, self.parameters)

    @staticmethod
    def _make_executor(folder: Path, parameters: dict[str, Any]) -> Any:
        import submitit

        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        try:
            executor.update_parameters(**parameters)
        except (ValueError, NameError, AssertionError) as err:  # submitit refuses an unknown parameter or type
            raise RegablateError(f"grid launcher.slurm: {first_line(err)}") from None
        return executor

    def check(self) -> None:
        """One line, before anything is submitted, when Slurm would never run one run's job.

        submitit submits one run's job script, written as for the sweep, with ``--test-only`` among its
        ``#SBATCH`` lines, from a scratch folder: ``sbatch`` then says whether and when Slurm would
        start the job, and submits nothing (submitit, finding no job id in the answer, raises
        ``FailedSubmissionError``: the job was accepted). A refusal is ``FailedJobError`` with sbatch's
        reasons, which submitit also prints to stderr (kept off the terminal: the refusal is one line).
        """
        from submitit.core.utils import FailedJobError, FailedSubmissionError

        extra = {**self.parameters["slurm_additional_parameters"], "test_only": True}
        with tempfile.TemporaryDirectory(prefix="regablate-check-") as scratch:
            executor = self._make_executor(Path(scratch), {**self.parameters, "slurm_additional_parameters": extra})
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    executor.submit(_nothing)
            except FailedSubmissionError:
                return
            except FailedJobError as err:
                answer = str(err)
            except OSError as err:
                raise RegablateError(f"--launcher slurm: cannot ask Slurm about the job ({err})") from None
        reasons = [line.removeprefix("sbatch: error: ").strip() for line in answer.splitlines() if line.strip()]
        raise RegablateError(
            f"Slurm refuses each run's job ({self.shape.describe()}{_resources(self.executor.parameters)}): "
            f"{'; '.join(reasons) or 'sbatch --test-only failed'}; "
            f"{cluster_capacity(self.executor.parameters.get('partition'))}. "
            "Fit the job to the cluster (launcher.nodes_per_run, devices_per_run, launcher.slurm)"
        )

    def run(self, jobs: list[RunJob]) -> dict[str, bool]:
        previous = read_jobs(self.folder)
        recorded = {name: entry["job_id"] for name, entry in previous.items()}
        alive = squeue_states(list(recorded.values())) or {}
        waiting: dict[Any, RunJob] = {}
        fresh = []
        import submitit

        for job in jobs:
            entry = previous.get(job.run.name)
            if entry and entry["job_id"] in alive:
                slurm_job: submitit.SlurmJob[Any] = submitit.SlurmJob(
                    self.folder, entry["job_id"], tasks=tuple(range(entry["tasks"]))
                )
                waiting[slurm_job] = job
                state = alive[entry["job_id"]]
                self.on_event("start", job, f"slurm job {entry['job_id']} (from an earlier sweep, still {state})")
            else:
                fresh.append(job)
        if fresh:
            self.executor.update_parameters(name=f"regablate-{fresh[0].run_dir.parent.name}")
            try:
                with self.executor.batch():
                    submitted = [self.executor.submit(SlurmRun(job, self.shape, self.max_requeues)) for job in fresh]
            except Exception as err:
                raise RegablateError(f"sbatch refused the jobs: {first_line(err)}") from None
            for job, slurm_job in zip(fresh, submitted):
                previous[job.run.name] = {"job_id": slurm_job.job_id, "tasks": self.shape.tasks}
                waiting[slurm_job] = job
            write_json_atomic(self.folder / JOBS_FILE, previous)
            for job, slurm_job in zip(fresh, submitted):
                self.on_event("start", job, f"slurm job {slurm_job.job_id}")
        return self.wait(waiting)

    def wait(self, waiting: dict[Any, RunJob]) -> dict[str, bool]:
        """Poll until every job has ended: all its tasks' result files, or ``squeue`` no longer listing it."""
        results: dict[str, bool] = {}
        requeues = {job.run.name: _requeues(job) for job in waiting.values()}
        missing: dict[str, int] = {}
        last_query = time.monotonic()
        while waiting:
            time.sleep(POLL_SECONDS)
            tick = time.monotonic() - last_query >= SQUEUE_EVERY_S  # squeue and the summaries, now and then
            listed = None
            if tick:
                listed, last_query = squeue_states([j.job_id for j in waiting]), time.monotonic()
            for slurm_job, job in list(waiting.items()):
                if tick and (count := _requeues(job)) > requeues[job.run.name]:
                    requeues[job.run.name] = count
                    self.on_event("requeued", job, count)
                if _has_results(slurm_job):
                    self._collect(slurm_job, job)
                elif listed is not None and slurm_job.job_id not in listed:
                    missing[slurm_job.job_id] = missing.get(slurm_job.job_id, 0) + 1
                    if missing[slurm_job.job_id] < 2:  # ended between the two looks: its results come next
                        continue
                    self._vanished(slurm_job, job)
                else:
                    if listed is not None:
                        missing.pop(slurm_job.job_id, None)
                    continue
                del waiting[slurm_job]
                ok = is_complete(job.run_dir, [stage.name for stage in job.stages])
                results[job.run.name] = ok
                self.on_event("done", job, ok)
        return results

    def _collect(self, slurm_job: Any, job: RunJob) -> None:
        """A job that ended with its result files: task 0's exception, if any, goes into the run's log."""
        try:
            slurm_job.task(0).result()
        except Exception as err:
            _log(job.run_dir, f"slurm job {slurm_job.job_id} failed: {err}")

    def _vanished(self, slurm_job: Any, job: RunJob) -> None:
        """A job that left the queue without results (time limit without requeue, scancel, node failure)."""
        summary = RunRecord(job.run_dir).read()
        reason = f"slurm job {slurm_job.job_id} ended without finishing (time limit, scancel or node failure)"
        _log(job.run_dir, f"{reason}; its own log: {slurm_job.paths.stdout}")
        for stage in job.stages:
            if summary.get(stage_key(stage.name)) in (RUNNING, REQUEUED):
                mark_finished(job.run_dir, stage.name, None, 0.0, reason=reason)


def _has_results(slurm_job: Any) -> bool:
    """Every task has written its result file (read from disk: no ``sacct``, which many clusters lack)."""
    return all(slurm_job.task(task).paths.result_pickle.exists() for task in range(slurm_job.num_tasks))


def _log(run_dir: Path, line: str) -> None:
    with (run_dir / LOG_FILE).open("a") as log:
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


def _requeues(job: RunJob) -> int:
    summary = RunRecord(job.run_dir).read()
    return sum(int(summary.get(f"{stage_key(stage.name)}/requeues", 0)) for stage in job.stages)


def _nothing() -> None:
    """The function of ``SlurmLauncher.check``'s test-only job, which never runs."""


def _resources(parameters: dict[str, Any]) -> str:
    """The resources of a job that Slurm refused, from submitit's Slurm-side parameters."""
    parts = [f", {parameters['cpus_per_task']} CPU(s) per task"] if "cpus_per_task" in parameters else []
    if parameters.get("gpus_per_node"):
        parts.append(f", {parameters['gpus_per_node']} GPU(s) per node")
    if "mem" in parameters:
        parts.append(f", {parameters['mem']} per node")
    if "partition" in parameters:
        parts.append(f", partition {parameters['partition']}")
    return "".join(parts)


def cluster_capacity(partition: str | None) -> str:
    """What ``sinfo`` says the partition (or every partition) has: nodes, CPUs, memory, GPUs."""
    command = ["sinfo", "-h", "-o", "%P|%D|%c|%m|%G"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "sinfo unavailable"
    rows = [line.split("|") for line in result.stdout.splitlines() if line.count("|") == 4]
    if not rows:
        return "sinfo lists no partition"
    described = []
    for name, nodes, cpus, memory, gres in rows:
        default = name.endswith("*")
        name = name.rstrip("*")
        if (partition and name != partition) or (not partition and not default):
            continue
        gpus = "no GPUs" if gres in ("(null)", "") else gres
        described.append(f"partition {name}: {nodes} node(s) of {cpus} CPUs, {memory} MB, {gpus}")
    if not described:
        names = [row[0].rstrip("*") + (" (default)" if row[0].endswith("*") else "") for row in rows]
        return f"partition {partition} does not exist here; partitions: {', '.join(names)}"
    return "; ".join(described)
