"""Run folders and atomic files: what every command reads from and writes into ``runs/<experiment>/<run>/``.

A run folder holds ``config.yaml``, ``checkpoints/`` and ``summary.json`` (flat keys that other
tools read). Everything here that writes does it atomically: into a temporary name beside the
target, then renamed into place, so a reader sees the old file or the new one, never half of
one, and a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from regablate.errors import RegablateError

SUMMARY_FILE = "summary.json"
Which = Literal["best", "last"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed into ``path`` when the block succeeds.

    The file keeps ``path``'s suffix (writers that pick a format by it still work) and ends up
    readable by all, as a plain write would leave it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_folder_atomic(out: str | Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary folder next to ``out`` with ``write``, then rename it into place (replacing ``out``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = staging.with_suffix(".old")
    try:
        write(staging)
        if out.exists():
            out.rename(old)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# A run's axis values go into its summary as ``axis/<config key>``, except the register count and the
# seed, which every run records under their own keys (``num_registers``, ``seed``).
REGISTER_KEY = "model.init_args.num_registers"
SEED_KEY = "seed_everything"
NAME_PREFIXES = {REGISTER_KEY: "r", SEED_KEY: "s"}
# Keys that older regablate wrote, and what they are now: the one place that translates.
RENAMED_KEYS = {f"axis/{REGISTER_KEY}": "num_registers"}


def run_name(values: dict[str, Any], labels: Collection[str] = ()) -> str:
    """A run's folder name from its config values, in their order: ``r4_s0`` for registers and seed.

    A key in ``labels`` (a grid's named axis) adds its value as it is, any other key
    ``<last key component>-<value>``.
    """
    parts = []
    for key, value in values.items():
        prefix = "" if key in labels else NAME_PREFIXES.get(key, key.rsplit(".", 1)[-1] + "-")
        parts.append(f"{prefix}{value}".replace("/", "-"))
    return "_".join(parts) or "run"


class RunRecord:
    """A run folder's ``summary.json``: the only code that reads or writes it.

    Flat keys (see the DESIGN contract): the final metrics, ``num_registers``, ``seed``,
    ``status``, and the sweep's ``stages/<name>...`` bookkeeping. Writes merge into what is there
    and are atomic. A summary written by an older regablate reads with today's keys
    (``RENAMED_KEYS``), and is rewritten with them at its next update.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / SUMMARY_FILE

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> dict[str, Any]:
        """The summary, or an empty dict before anything wrote one; a file that is not a JSON mapping is refused."""
        if not self.path.is_file():
            return {}
        try:
            summary = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RegablateError(f"cannot read {self.path}: {first_line(err)}; remove the file or the run") from None
        if not isinstance(summary, dict):
            raise RegablateError(f"cannot read {self.path}: it holds a {type(summary).__name__}, not a mapping")
        return current_keys(summary)

    def update(self, values: dict[str, Any], drop: Collection[str] = ()) -> dict[str, Any]:
        """Merge ``values`` into the summary, less the keys in ``drop``, and write it atomically."""
        summary = {key: value for key, value in self.read().items() if key not in drop} | values
        write_json_atomic(self.path, summary)
        return summary

    @staticmethod
    def axis_values(axes: dict[str, Any]) -> dict[str, Any]:
        """The summary keys of a run's axis values (``axis/<key>``; the register count as ``num_registers``)."""
        return current_keys({f"axis/{key}": value for key, value in axes.items()})


def current_keys(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` with older keys under today's names (a value under today's name wins)."""
    renamed = {new: summary[old] for old, new in RENAMED_KEYS.items() if old in summary}
    return {key: value for key, value in summary.items() if key not in RENAMED_KEYS} | {
        key: value for key, value in renamed.items() if key not in summary
    }


def find_checkpoint(run_dir: str | Path, which: Which = "best") -> Path:
    """``checkpoints/best-*.ckpt`` (newest) or ``checkpoints/last.ckpt`` of a run folder.

    ``best`` falls back to ``last`` when the run saved no best checkpoint.
    """
    folder = Path(run_dir) / "checkpoints"
    if not Path(run_dir).is_dir():
        raise RegablateError(f"run folder not found: {run_dir}")
    candidates = sorted(folder.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime) if which == "best" else []
    candidates = candidates or [p for p in [folder / "last.ckpt"] if p.is_file()]
    if not candidates:
        raise RegablateError(f"{run_dir} has no checkpoints/last.ckpt or best-*.ckpt: did its fit run?")
    return candidates[-1]


def checkpoint_hparams(path: str | Path) -> dict[str, Any]:
    """The task hyper-parameters stored in a Lightning checkpoint (read without unpickling code)."""
    import torch  # here: the command line reads run folders without importing torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RegablateError(f"cannot read checkpoint {path}: {first_line(err)}") from None
    hparams = state.get("hyper_parameters") if isinstance(state, dict) else None
    if not hparams or "model_name" not in hparams:
        raise RegablateError(f"{path} is not a regablate training checkpoint (no model_name in its hyper-parameters)")
    return hparams


def is_training_checkpoint(path: Path) -> bool:
    """A run folder, or a Lightning ``.ckpt`` that regablate wrote (it knows how to build its backbone)."""
    if path.is_dir():
        return True
    if path.suffix != ".ckpt":
        return False
    try:
        checkpoint_hparams(path)
    except RegablateError:
        return False
    return True


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none (for one-line errors)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def intervention_label(keys: Mapping[str, Any]) -> str | None:
    """How a report names results probed with an intervention (from their summary keys); None for the plain model."""
    parts = []
    if keys.get("test_registers") is not None:
        parts.append(f"K={keys['test_registers']} test registers")
    kind = keys.get("register_intervention")
    if kind not in (None, "none"):
        start = keys.get("intervention_from_block") or 0
        parts.append(f"registers {kind}" + (f" from block {start}" if start else ""))
    return ", ".join(parts) or None
