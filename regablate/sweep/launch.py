"""Running a grid's runs on this machine: each stage of each run as its own ``python -m regablate`` process.

One process per stage keeps ranks and seeds clean: LightningCLI and Lightning's DDP launcher
re-execute ``sys.argv``, so a run must own its process. ``LocalLauncher`` packs runs onto this
machine (``max_parallel`` at a time, ``devices_per_run`` GPUs each, through
``CUDA_VISIBLE_DEVICES``); with a ``Preloaded`` parent (``regablate.sweep.preload``, the default
of ``regablate sweep``) each stage is forked from a process that imported torch, Lightning, timm
and regablate once, instead of starting Python anew. ``StageProcess``, ``stage_command`` and
``stage_env`` are shared with the Slurm launcher (``regablate.sweep.slurm``), whose jobs run the
same stages as new processes.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

from regablate.errors import RegablateError
from regablate.sweep.deathsig import die_with_parent
from regablate.sweep.grid import LIGHTNING_COMMANDS, PlannedRun, Stage
from regablate.sweep.preload import Preloaded
from regablate.sweep.state import COMPLETE, LOG_FILE, mark_finished, mark_running, resumable_checkpoint, stage_state

POLL_SECONDS = 0.2


@dataclass
class RunJob:
    """A run ready to launch: its folder, its resolved config and the stages it goes through."""

    run: PlannedRun
    run_dir: Path
    config: Path
    stages: list[Stage]

    def pending_stages(self) -> list[Stage]:
        return [stage for stage in self.stages if stage_state(self.run_dir, stage.name) != COMPLETE]


def stage_command(job: RunJob, stage: Stage) -> list[str]:
    """``python -m regablate <command> ...`` for one stage.

    LightningCLI commands take the run's resolved config; ``fit`` resumes from a whole
    ``last.ckpt`` when the run has one, the others evaluate the best checkpoint unless the stage's
    args name one. Tools (``probe``, ``inspect``, ...) take the run folder.
    """
    command = [sys.executable, "-m", "regablate", stage.command]
    if stage.command not in LIGHTNING_COMMANDS:
        return [*command, str(job.run_dir), *stage.argv]
    command += ["--config", str(job.config)]
    if stage.command == "fit" and resumable_checkpoint(job.run_dir) is not None:
        command += ["--ckpt_path", "last"]
    elif stage.command != "fit" and "--ckpt_path" not in stage.args:
        command += ["--ckpt_path", "best"]
    return [*command, *stage.argv]


class Started(Protocol):
    """A started stage process (a ``subprocess.Popen``, or a ``preload.ForkedStage``)."""

    def poll(self) -> int | None: ...

    def wait(self) -> int: ...

    def kill(self) -> None: ...


def start_process(command: list[str], log: TextIO, env: dict[str, str]) -> Started:
    """``command`` as a new process writing into ``log``; it gets SIGKILL when this process dies."""
    guard = functools.partial(die_with_parent, os.getpid())
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=guard)


class StageProcess:
    """One running stage: its process, its log file, and when it started.

    ``record`` (the default) marks the stage running now and finished in ``finish``; a Slurm
    task other than task 0 runs its share of a stage without touching the run's state, into a
    log of its own (``log``). ``preloaded`` forks the stage from that parent instead of starting
    ``python -m regablate`` (the command still heads the log: it is what the stage runs).
    """

    def __init__(
        self,
        job: RunJob,
        stage: Stage,
        env: dict[str, str],
        *,
        extra_args: tuple[str, ...] = (),
        log: str = LOG_FILE,
        record: bool = True,
        preloaded: Preloaded | None = None,
    ) -> None:
        self.job, self.stage, self.record = job, stage, record
        if record:
            mark_running(job.run_dir, stage.name, job.run.axes)
        command = [*stage_command(job, stage), *extra_args]
        self.log: TextIO = open(job.run_dir / log, "a")  # noqa: SIM115 - closed in finish()
        self.log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} stage {stage.name}: {' '.join(command)}\n")
        self.log.flush()
        self.started = time.perf_counter()
        self.process = (preloaded.start if preloaded is not None else start_process)(command, self.log, env)

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self) -> int:
        return self.process.wait()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def close_log(self, exit_code: int, note: str = "") -> None:
        killed = killed_by(exit_code)
        note = f" ({killed}){note}" if killed else note
        self.log.write(f"==== stage {self.stage.name} exited {exit_code} after {self.seconds:.1f} s{note}\n")
        self.log.close()

    def finish(self, exit_code: int) -> None:
        """Close the log and record the stage's end in the run's summary (a stage killed by a signal names it)."""
        seconds = self.seconds
        self.close_log(exit_code)
        if self.record:
            mark_finished(self.job.run_dir, self.stage.name, exit_code, seconds, reason=killed_by(exit_code))


def killed_by(exit_code: int) -> str | None:
    """``killed by SIGSEGV`` for a process that a signal ended (a negative exit code), else None."""
    if exit_code >= 0:
        return None
    try:
        name = signal.Signals(-exit_code).name
    except ValueError:
        name = f"signal {-exit_code}"
    return f"killed by {name}"


def stage_env(
    base: dict[str, str] | None = None, cuda_devices: str | None = None, slurm_world: bool = False
) -> dict[str, str]:
    """The environment of a stage process.

    Inside a Slurm job, a stage sees no Slurm world unless ``slurm_world``: with
    ``SLURM_JOB_NAME=interactive`` Lightning ignores the job's tasks and starts its own ranks, as
    on a workstation. The fit of a multi-task job keeps the Slurm variables, and Lightning's
    ``SLURMEnvironment`` takes the job's tasks (``SLURM_PROCID``, ``SLURM_NTASKS``) as its DDP ranks.
    """
    env = dict(os.environ if base is None else base)
    env.pop("PL_GLOBAL_SEED", None)  # set in the sweep by config resolution; each run seeds itself
    if "SLURM_JOB_ID" in env and not slurm_world:
        env["SLURM_JOB_NAME"] = "interactive"
    if cuda_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_devices
    return env


def device_slots(max_parallel: int, devices_per_run: int | None, num_gpus: int) -> list[str | None]:
    """One entry per run that may run at once: its ``CUDA_VISIBLE_DEVICES``, or None (CPU / all GPUs)."""
    if not devices_per_run or num_gpus == 0:
        return [None] * max_parallel
    fitting = num_gpus // devices_per_run
    if fitting == 0:
        raise RegablateError(f"--devices_per_run {devices_per_run} needs that many GPUs; this machine has {num_gpus}")
    return [
        ",".join(str(gpu) for gpu in range(slot * devices_per_run, (slot + 1) * devices_per_run))
        for slot in range(min(max_parallel, fitting))
    ]


class LocalLauncher:
    """Run jobs on this machine, one slot each, starting the next as soon as a slot frees up."""

    def __init__(
        self,
        slots: list[str | None],
        on_event: Callable[[str, RunJob, Any], None],
        preloaded: Preloaded | None = None,
    ) -> None:
        self.slots = slots
        self.on_event = on_event  # ("start", job, stage) | ("done", job, ok)
        self.preloaded = preloaded

    def run(self, jobs: list[RunJob]) -> dict[str, bool]:
        """Run ``jobs``; each run's success by name. A stage still running when this ends (Ctrl-C) is killed."""
        active: dict[int, StageProcess] = {}
        try:
            return self._run(jobs, active)
        finally:
            for process in active.values():
                process.process.kill()

    def _run(self, jobs: list[RunJob], active: dict[int, StageProcess]) -> dict[str, bool]:
        pending = deque(jobs)
        results: dict[str, bool] = {}
        while pending or active:
            for slot, devices in enumerate(self.slots):
                if slot not in active and pending:
                    job = pending.popleft()
                    active[slot] = self._start(job, job.pending_stages()[0], devices)
            time.sleep(POLL_SECONDS)
            for slot, process in list(active.items()):
                exit_code = process.poll()
                if exit_code is None:
                    continue
                process.finish(exit_code)
                remaining = process.job.pending_stages()
                if exit_code == 0 and remaining:
                    active[slot] = self._start(process.job, remaining[0], self.slots[slot])
                    continue
                del active[slot]
                results[process.job.run.name] = exit_code == 0
                self.on_event("done", process.job, exit_code == 0)
        return results

    def _start(self, job: RunJob, stage: Stage, devices: str | None) -> StageProcess:
        self.on_event("start", job, stage)
        return StageProcess(job, stage, stage_env(cuda_devices=devices), preloaded=self.preloaded)
