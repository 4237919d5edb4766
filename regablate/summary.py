"""`summary.json`, the file other tools read from a run folder: flat keys, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.json"


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """The run's summary, or an empty dict when it has none yet."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def update_summary(run_dir: str | Path, values: dict[str, Any]) -> dict[str, Any]:
    """Merge ``values`` into the run's summary and write it atomically (temp file + rename)."""
    summary = {**read_summary(run_dir), **values}
    write_json_atomic(Path(run_dir) / SUMMARY_FILE, summary)
    return summary


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
