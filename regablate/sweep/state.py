"""What the sweep knows about a run, kept in the run's own ``summary.json`` (written atomically).

Per stage: ``stages/<name>`` is ``running``, ``requeued``, ``complete`` or ``failed``. A started
stage records ``stages/<name>/started`` (Unix time) and who runs it: ``stages/<name>/host`` and
``stages/<name>/pid`` (the sweep's process, or task 0 of a Slurm job, whose id is
``slurm/job_id``; null for a local sweep). A finished stage adds ``stages/<name>/seconds`` (the
stage process's wall time) and ``stages/<name>/ended``; a failed one ``stages/<name>/exit_code``
and ``stages/<name>/log_tail`` (and ``stages/<name>/error`` when the log cannot say why: a
requeue limit, a job that vanished). A stage stopped at a Slurm time limit and requeued is
``requeued``, with the count so far in ``stages/<name>/requeues`` (each job requeued at most
``launcher.max_requeues`` times) and the time of those attempts in ``stages/<name>/requeued_seconds``.

The sweep marks a stage ``running`` *before* it starts, so the run folder holds a summary from
then on: the CLI's clean-up of a failed start (no checkpoint, no summary) then keeps the log and
config the sweep wrote there. A stage is done only when its process exited 0 and the sweep wrote
``complete`` afterwards, so a sweep killed at any moment re-runs at most the stage it was in.
"""

from __future__ import annotations

import os
import socket
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from regablate.runs import RunRecord

COMPLETE, RUNNING, FAILED, REQUEUED = "complete", "running", "failed", "requeued"
LOG_FILE = "sweep.log"
CONFIG_FILE = "sweep_config.yaml"
LOG_TAIL_LINES = 20
SLURM_JOB_KEY = "slurm/job_id"


def stage_key(stage: str) -> str:
    return f"stages/{stage}"


def stage_state(run_dir: Path, stage: str) -> str | None:
    return RunRecord(run_dir).read().get(stage_key(stage))


def is_complete(run_dir: Path, stages: list[str]) -> bool:
    summary = RunRecord(run_dir).read()
    return all(summary.get(stage_key(stage)) == COMPLETE for stage in stages)


def slurm_job_id(env: Mapping[str, str] | None = None) -> str | None:
    """This process's Slurm job as ``squeue`` names it (``<array>_<index>`` for an array element), or None."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def mark_running(run_dir: Path, stage: str, axes: dict[str, Any]) -> None:
    """Record that ``stage`` starts, with the run's axis values for the report (``RunRecord.axis_values``)."""
    key = stage_key(stage)
    values = RunRecord.axis_values(axes)
    values.update(
        {
            key: RUNNING,
            f"{key}/started": round(time.time(), 3),
            f"{key}/host": socket.gethostname(),
            f"{key}/pid": os.getpid(),
        }
    )
    values[SLURM_JOB_KEY] = slurm_job_id()  # None outside Slurm: a local sweep's stage, even after a Slurm one
    RunRecord(run_dir).update(values)


FAILURE_KEYS = ("log_tail", "exit_code", "error")  # stages/<name>/...: what a failed attempt leaves


def mark_finished(run_dir: Path, stage: str, exit_code: int | None, seconds: float, reason: str | None = None) -> None:
    """Record the stage's end: ``complete`` after exit code 0, else ``failed`` with the log's tail.

    ``exit_code`` is None for a stage whose process was never seen to end (its Slurm job left the
    queue); ``reason`` (``stages/<name>/error``) says why a stage failed when its log cannot.
    """
    key = stage_key(stage)
    values: dict[str, Any] = {f"{key}/seconds": round(seconds, 3), f"{key}/ended": round(time.time(), 3)}
    if exit_code == 0:  # an earlier attempt's failure no longer describes the stage
        RunRecord(run_dir).update({**values, key: COMPLETE}, drop=[f"{key}/{k}" for k in FAILURE_KEYS])
        return
    values.update({key: FAILED, f"{key}/log_tail": log_tail(run_dir)})
    if exit_code is not None:
        values[f"{key}/exit_code"] = exit_code
    if reason is not None:
        values[f"{key}/error"] = reason
    RunRecord(run_dir).update(values)


def mark_requeued(run_dir: Path, stage: str, requeues: int, seconds: float) -> None:
    """``stage`` stopped at a time limit after saving its state; its job goes back into the queue.

    The attempt's wall time adds up in ``stages/<name>/requeued_seconds`` (``seconds`` stays the
    last attempt's own, as for any stage).
    """
    key = stage_key(stage)
    record = RunRecord(run_dir)
    before = record.read().get(f"{key}/requeued_seconds", 0.0)
    values = {
        key: REQUEUED,
        f"{key}/requeues": requeues,
        f"{key}/requeued_seconds": round(before + seconds, 3),
        f"{key}/ended": round(time.time(), 3),
    }
    record.update(values)


def log_tail(run_dir: Path, lines: int = LOG_TAIL_LINES) -> str:
    path = run_dir / LOG_FILE
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def resumable_checkpoint(run_dir: Path) -> Path | None:
    """``checkpoints/last.ckpt`` when it is a whole file (a kill while saving leaves a torn zip)."""
    path = run_dir / "checkpoints" / "last.ckpt"
    if path.is_file() and zipfile.is_zipfile(path):
        return path
    return None
