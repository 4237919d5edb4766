"""Write a prepared dataset (``scripts/prepare_*.py``): rows streamed into a ``save_to_disk`` folder.

Each split is a generator of rows that ``Dataset.from_generator`` writes to Arrow shards as they
come (``writer_batch_size`` rows in memory at a time, never the dataset), counted by
:class:`~regablate.progress.Progress` (an ETA; plain lines off a terminal); the splits are then
saved with ``save_to_disk`` into a staging folder that is renamed into place only when everything
succeeded, so a failed or interrupted preparation leaves no half-written output (and no cache: the
shards are written to a temporary folder beside it).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from regablate.errors import RegablateError
from regablate.progress import Progress
from regablate.runs import write_folder_atomic

log = logging.getLogger(__name__)

WRITER_BATCH_SIZE = 100  # rows held before each Arrow write: ~100 encoded images


@dataclass
class SplitRows:
    """One split to write: ``rows(**kwargs)`` yields its rows; ``total`` drives the progress and its ETA."""

    rows: Callable[..., Iterator[dict[str, Any]]]
    kwargs: dict[str, Any]
    total: int


def _with_progress(rows: Callable[..., Iterator[dict[str, Any]]], total: int, desc: str, **kwargs: Any) -> Iterator:
    yield from Progress(f"prepare: {desc}", total).wrap(rows(**kwargs))


def _unsharded(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Lists as tuples: ``from_generator`` splits list arguments into shards and calls the generator once per item."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in kwargs.items()}


def write_prepared(output: str | Path, features: datasets.Features, splits: dict[str, SplitRows]) -> Path:
    """Stream ``splits`` into a ``save_to_disk`` dataset at ``output`` (replaced atomically); return its path."""
    output = Path(output).expanduser()

    def write(staging: Path) -> None:
        with tempfile.TemporaryDirectory(dir=staging.parent, prefix=f".{output.name}.shards.") as shards:
            written = {}
            bars = datasets.utils.logging.is_progress_bar_enabled()
            datasets.disable_progress_bars()  # ours has the total and the ETA
            try:
                for split, spec in splits.items():  # a RegablateError inside a generator comes out wrapped
                    written[split] = datasets.Dataset.from_generator(
                        _with_progress,
                        features=features,
                        cache_dir=shards,
                        writer_batch_size=WRITER_BATCH_SIZE,
                        gen_kwargs={"rows": spec.rows, "total": spec.total, "desc": split, **_unsharded(spec.kwargs)},
                        split=datasets.Split(split),
                    )
            except datasets.exceptions.DatasetGenerationError as err:
                cause = err.__cause__ or err.__context__
                if isinstance(cause, RegablateError):
                    raise cause from None
                raise
            finally:
                if bars:
                    datasets.enable_progress_bars()
            datasets.DatasetDict(written).save_to_disk(str(staging))

    write_folder_atomic(output, write)
    return output
