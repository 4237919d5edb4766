"""What the sweep knows about a run, kept in the run's own ``summary.json`` (written atomically).

Per stage: ``stages/<name>`` is ``running``, ``complete`` or ``failed``; a finished stage adds
``stages/<name>/seconds`` (the stage process's wall time) and a failed one
``stages/<name>/exit_code`` and ``stages/<name>/log_tail``. The sweep marks a stage ``running``
*before* it starts, so the run folder holds a summary from then on: the CLI's clean-up of a
failed start (no checkpoint, no summary) then keeps the log and config the sweep wrote there.
A stage is done only when its process exited 0 and the sweep wrote ``complete`` afterwards, so
a sweep killed at any moment re-runs at most the stage it was in.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from regablate.runs import read_summary, update_summary

COMPLETE, RUNNING, FAILED = "complete", "running", "failed"
LOG_FILE = "sweep.log"
CONFIG_FILE = "sweep_config.yaml"
LOG_TAIL_LINES = 20


def stage_key(stage: str) -> str:
    return f"stages/{stage}"


def stage_state(run_dir: Path, stage: str) -> str | None:
    return read_summary(run_dir).get(stage_key(stage))


def is_complete(run_dir: Path, stages: list[str]) -> bool:
    summary = read_summary(run_dir)
    return all(summary.get(stage_key(stage)) == COMPLETE for stage in stages)


def mark_running(run_dir: Path, stage: str, axes: dict[str, Any]) -> None:
    """Record that ``stage`` starts, with the run's axis values (``axis/<key>``) for the report."""
    values = {f"axis/{key}": value for key, value in axes.items()}
    update_summary(run_dir, {**values, stage_key(stage): RUNNING})


def mark_finished(run_dir: Path, stage: str, exit_code: int, seconds: float) -> None:
    key = stage_key(stage)
    values: dict[str, Any] = {f"{key}/seconds": round(seconds, 3)}
    if exit_code == 0:
        values[key] = COMPLETE
    else:
        values.update({key: FAILED, f"{key}/exit_code": exit_code, f"{key}/log_tail": log_tail(run_dir)})
    update_summary(run_dir, values)


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
