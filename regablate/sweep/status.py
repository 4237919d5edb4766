"""``regablate sweep GRID --status true``: where each run of a grid stands, without running anything.

Read from each run's ``summary.json`` (stage states, start times, who runs a stage) and, for a
Slurm sweep, from ``<experiment>/slurm/jobs.json`` (each run's job) and ``squeue`` (whether that
job is queued or running now; ``sacct``, where accounting is on, for jobs that have left the
queue). A run is:

* ``finished``: every stage complete; ``failed``: a stage failed (the summary says why);
* ``running``: a stage started and its process is alive (``squeue`` says RUNNING, or the sweep's
  process on this machine still exists);
* ``queued``: its Slurm job waits (first start, or requeued after a time limit);
* ``interrupted``: a stage started but nothing runs it any more (the sweep or the job is gone):
  run the sweep again to resume it; ``not started``.

The ETA comes from the finished runs: their mean wall time (every stage, requeued attempts
included), the time the running ones have left of it, and ``max_parallel`` runs at once.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regablate.progress import duration
from regablate.runs import RunRecord
from regablate.sweep.grid import Grid, PlannedRun
from regablate.sweep.slurm import read_jobs, squeue_states
from regablate.sweep.state import COMPLETE, FAILED, REQUEUED, RUNNING, SLURM_JOB_KEY, stage_key

ACTIVE_JOB_STATES = ("RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT")


@dataclass
class RunStatus:
    """One row of the status table."""

    name: str
    state: str
    stage: str = ""
    job: str = ""
    job_state: str = ""
    elapsed: float | None = None  # seconds of work so far (finished runs: their whole wall time)
    note: str = ""


def run_seconds(summary: dict[str, Any], stages: list[str]) -> float:
    """The wall time of a run's finished stages, requeued attempts included."""
    return sum(
        float(summary.get(f"{stage_key(s)}/seconds", 0)) + float(summary.get(f"{stage_key(s)}/requeued_seconds", 0))
        for s in stages
    )


def run_status(
    name: str,
    summary: dict[str, Any],
    stages: list[str],
    job: str | None,
    queue: dict[str, str] | None,
    ended_jobs: dict[str, str],
    now: float,
) -> RunStatus:
    """The state of one run from its summary and, for a Slurm job, what ``squeue``/``sacct`` say of it.

    ``job`` is the run's latest Slurm job (None for a local sweep), ``queue`` what ``squeue`` lists
    (None where there is no squeue), ``ended_jobs`` the final states of jobs that left the queue.
    """
    states = {stage: summary.get(stage_key(stage)) for stage in stages}
    if all(state == COMPLETE for state in states.values()):
        return RunStatus(name, "finished", job=job or "", elapsed=run_seconds(summary, stages))
    failed = next((stage for stage, state in states.items() if state == FAILED), None)
    if failed is not None:
        key = stage_key(failed)
        why = summary.get(f"{key}/error") or _last_line(summary.get(f"{key}/log_tail", ""))
        code = summary.get(f"{key}/exit_code")
        note = "; ".join(part for part in (f"exit {code}" if code is not None else "", why) if part)
        return RunStatus(name, "failed", failed, job or "", note=note)
    stage = next(stage for stage, state in states.items() if state != COMPLETE)
    state, key = states[stage], stage_key(stage)
    done = run_seconds(summary, [s for s in stages if states[s] == COMPLETE])
    status = RunStatus(name, "not started", stage if state is not None else "", elapsed=done or None)
    requeues = int(summary.get(f"{key}/requeues", 0))
    notes = [f"requeued {requeues}x at a time limit"] if requeues else []
    if state == RUNNING and summary.get(SLURM_JOB_KEY) is None:
        job = None  # started by a local sweep (perhaps after an earlier Slurm one)
    if job is None:
        if state is not None:
            status.state = _local_state(summary, key, state)
        if status.state == "interrupted":
            notes.append("its sweep has ended: run the sweep again to resume")
    else:
        status.job = job
        listed = (queue or {}).get(job)
        if listed is not None:
            status.job_state = listed
            status.state = "queued" if listed.startswith("PENDING") else "running"
            if listed not in ACTIVE_JOB_STATES and not listed.startswith("PENDING"):
                status.state = listed.lower()
        elif queue is None:
            status.state = {RUNNING: "running", REQUEUED: "queued", None: "queued"}.get(state) or str(state)
            notes.append("squeue is not available here")
        else:
            status.state, status.job_state = "interrupted", ended_jobs.get(job, "")
            notes.append("its Slurm job has ended: run the sweep again to resume")
    if status.state == "running" and state == RUNNING and f"{key}/started" in summary:
        status.elapsed = done + max(0.0, now - float(summary[f"{key}/started"]))
    status.note = "; ".join(notes)
    return status


def _local_state(summary: dict[str, Any], key: str, state: str) -> str:
    """A stage of a local sweep: running while the sweep process that started it is alive."""
    if state != RUNNING:
        return state
    host, pid = summary.get(f"{key}/host"), summary.get(f"{key}/pid")
    if host != socket.gethostname() or pid is None:
        return "running"  # started on another machine: its process cannot be checked from here
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return "interrupted"
    except PermissionError:
        pass  # alive, someone else's
    return "running"


def _last_line(text: str) -> str:
    lines = [line for line in str(text).splitlines() if line.strip()]
    return lines[-1].strip()[:160] if lines else ""


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """Final states (COMPLETED, TIMEOUT, CANCELLED, ...) of jobs that left the queue, where accounting is on."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    command = ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    if result.returncode != 0:
        return {}
    states = {}
    for line in result.stdout.splitlines():
        job, _, state = line.partition("|")
        if job and state:
            states[job.strip()] = state.split()[0]
    return states


def collect(grid: Grid, runs: list[PlannedRun], experiment: Path, now: float | None = None) -> list[RunStatus]:
    """Every run's status, asking ``squeue`` once (and ``sacct`` for the jobs it no longer lists)."""
    now = time.time() if now is None else now
    summaries = {run.name: RunRecord(experiment / run.name).read() for run in runs}
    recorded = {name: entry["job_id"] for name, entry in read_jobs(experiment / "slurm").items()}
    jobs = {run.name: recorded.get(run.name) or summaries[run.name].get(SLURM_JOB_KEY) for run in runs}
    job_ids = sorted({job for job in jobs.values() if job})
    queue = squeue_states(job_ids) if job_ids else None
    gone = [job for job in job_ids if queue is not None and job not in queue]
    ended = sacct_states(gone)
    return [
        run_status(
            run.name, summaries[run.name], [s.name for s in grid.stages_of(run)], jobs[run.name], queue, ended, now
        )
        for run in runs
    ]


def eta_seconds(statuses: list[RunStatus], parallel: int) -> tuple[float, float] | None:
    """(ETA, mean run time) from the finished runs, or None before any run has finished."""
    finished = [s.elapsed for s in statuses if s.state == "finished" and s.elapsed]
    if not finished:
        return None
    mean = statistics.fmean(finished)
    left = [max(0.0, mean - (s.elapsed or 0.0)) for s in statuses if s.state == "running"]
    left += [mean - (s.elapsed or 0.0) for s in statuses if s.state in ("queued", "interrupted", "not started")]
    if not left:
        return None
    return sum(max(0.0, x) for x in left) / max(1, min(parallel, len(left))), mean


def format_status(grid: Grid, experiment: Path, statuses: list[RunStatus], parallel: int) -> str:
    """The status table: a headline with counts and ETA, then one line per run."""
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status.state] = counts.get(status.state, 0) + 1
    order = ["finished", "running", "queued", "interrupted", "failed", "not started"]
    parts = [f"{counts.pop(state)} {state}" for state in order if state in counts]
    parts += [f"{n} {state}" for state, n in sorted(counts.items())]
    lines = [f"sweep {grid.name} ({experiment}/): {len(statuses)} runs: {', '.join(parts)}"]
    header = ("run", "state", "stage", "slurm job", "time", "note")
    rows = [
        (
            s.name,
            s.state,
            s.stage or "-",
            f"{s.job} {s.job_state}".strip() or "-",
            duration(s.elapsed) if s.elapsed is not None else "-",
            s.note,
        )
        for s in statuses
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    eta = eta_seconds(statuses, parallel)
    if eta is not None:
        finished = sum(s.state == "finished" for s in statuses)
        lines.append(
            f"ETA {duration(eta[0])} (mean {duration(eta[1])} per run over {finished} finished, {parallel} at once)"
        )
    return "\n".join(line.rstrip() for line in lines)
