"""The feature store: one ``.npy`` file per split and field, written in chunks, memory-mapped on read.

``<root>/<key>/<split>/<field>.npy`` (``cls``, ``mean_patch``, ``patches``, ``keys`` and the targets
``label``, ``mask``, ``depth``, ``box``) beside ``<field>.json``, the file's provenance (the key's
parts: weights fingerprint, data config, precision; split and field). ``key`` hashes the weights
fingerprint together with the data config and the precision of the extraction. Each file holds one
array of all the split's samples, so a split's features never have to fit in memory:

* writing: :meth:`FeatureCache.allocate` has numpy lay out the file (``open_memmap``: the ``.npy``
  header, then room for every row, sparse until written) under a hidden partial name; each process
  writes the rows of its own samples into it (:class:`RowWriter`), batch by batch, through a numpy
  memory map of just those rows, unmapped after the batch (so a process never holds more than one
  batch's pages: mapping the whole file would count every row written in its resident memory);
  :meth:`commit` writes the provenance and renames the file into place once every rank is done.
* reading: :meth:`load` gives tensors over ``np.load(mmap_mode="c")`` (nothing is unpickled, only
  the rows a head touches are read from disk, and a stray write stays in the process). A field whose
  provenance differs from the expected one is an error, never silently reused.

Why numpy's format and not safetensors': safetensors has no incremental writer (``save_file`` and
``serialize_file`` take the whole tensor in memory), so a safetensors store needs a hand-written
header; ``.npy`` is written, sized and read by numpy's own ``np.lib.format``. Its header cannot carry
metadata, hence the JSON beside each file.

A run reuses whatever fields its splits already have and extracts only the missing ones. Stores of
the older safetensors layout (format 3) are not read: :meth:`remove_old_stores` deletes them (a store
is a cache; the fields are extracted again).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from regablate.errors import RegablateError
from regablate.runs import write_json_atomic

FORMAT = 4  # 3: safetensors files with the provenance in their header


@dataclass(frozen=True)
class FieldSpec:
    """Shape (per sample) and dtype of one stored field."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def numpy_dtype(self) -> np.dtype:
        """numpy's dtype of the field (torch's own mapping; bfloat16 has none and is never stored)."""
        return torch.empty(0, dtype=self.dtype).numpy().dtype

    def nbytes(self, num_samples: int) -> int:
        return num_samples * self.row_bytes


def cache_key(fingerprint: str, data_config: dict[str, Any], precision: str) -> str:
    """A short stable hash of the backbone fingerprint, the data config and the extraction precision."""
    text = json.dumps(
        {"format": FORMAT, "weights": fingerprint, "data": data_config, "precision": precision},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RowWriter:
    """Writes rows of one field into its allocated file; each process writes its own rows."""

    def __init__(self, path: Path, spec: FieldSpec, num_samples: int) -> None:
        self.path, self.spec, self.num_samples = path, spec, num_samples
        layout = np.lib.format.open_memmap(path, mode="r+")  # numpy reads its header: where the rows start
        self._data_start = layout.offset
        del layout

    def write(self, first_row: int, rows: Tensor) -> None:
        """Store ``rows`` (n, *shape) as samples ``first_row .. first_row + n - 1``."""
        if tuple(rows.shape[1:]) != self.spec.shape or first_row + len(rows) > self.num_samples:
            raise RegablateError(
                f"{self.path.stem}: got rows of shape {tuple(rows.shape[1:])} for samples {first_row}.."
                f"{first_row + len(rows) - 1}, expected {self.spec.shape} within {self.num_samples} samples "
                "(do all samples of a split have one size?)"
            )
        if rows.dtype != self.spec.dtype and not self.spec.dtype.is_floating_point and len(rows):
            info = torch.iinfo(self.spec.dtype)
            low, high = int(rows.min()), int(rows.max())
            if low < info.min or high > info.max:
                raise RegablateError(
                    f"{self.path.stem} values {low}..{high} do not fit {self.spec.dtype}; for masks, set the data "
                    "module's num_seg_classes and the probe's ignore_index to the values the data use"
                )
        if not len(rows):
            return
        window = np.memmap(
            self.path,
            dtype=self.spec.numpy_dtype,
            mode="r+",
            offset=self._data_start + first_row * self.spec.row_bytes,
            shape=(len(rows), *self.spec.shape),
        )
        window[...] = rows.detach().to("cpu", self.spec.dtype).numpy()
        del window  # unmapped; the kernel writes the dirty pages back as it does for any file write


class FeatureCache:
    """The fields of each split for one backbone, data config and precision."""

    def __init__(self, root: str | Path, fingerprint: str, data_config: dict[str, Any], precision: str) -> None:
        self.fingerprint = fingerprint
        self.data_config = json.loads(json.dumps(data_config, sort_keys=True, default=str))
        self.precision = precision
        self.root = Path(root)
        self.folder = self.root / cache_key(fingerprint, self.data_config, precision)

    def path(self, split: str, field: str) -> Path:
        return self.folder / split / f"{field}.npy"

    def provenance_path(self, split: str, field: str) -> Path:
        return self.folder / split / f"{field}.json"

    def partial_path(self, split: str, field: str) -> Path:
        return self.folder / split / f".{field}.partial.npy"

    def _meta(self, split: str, field: str) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "weights": self.fingerprint,
            "data": self.data_config,
            "precision": self.precision,
            "split": split,
            "field": field,
        }

    def cached(self, split: str, fields: set[str]) -> set[str]:
        """Which of ``fields`` the cache holds for ``split`` (each file's provenance checked)."""
        found = set()
        for field in fields:
            if self.path(split, field).is_file():
                self._open(split, field)  # raises on a file of another backbone or other data
                found.add(field)
        return found

    def _open(self, split: str, field: str) -> Tensor:
        path = self.path(split, field)
        try:
            meta = json.loads(self.provenance_path(split, field).read_text())
            array = np.load(path, mmap_mode="c")  # copy-on-write: writable for torch, never written back
        except Exception as err:
            raise RegablateError(
                f"cannot read probe cache {path} ({type(err).__name__}); delete it to recompute"
            ) from None
        if meta.get("weights") != self.fingerprint:
            raise RegablateError(
                f"probe cache {path} was written by another backbone (weights {str(meta.get('weights'))[:12]}, "
                f"this one {self.fingerprint[:12]}); delete {self.folder} to recompute"
            )
        expected = self._meta(split, field)
        if any(meta.get(k) != expected[k] for k in ("format", "data", "precision", "split", "field")):
            raise RegablateError(f"probe cache {path} was written for other data; delete {self.folder} to recompute")
        return torch.from_numpy(array)

    def load(self, split: str, fields: set[str]) -> dict[str, Tensor]:
        """The stored tensors of ``fields`` (memory-mapped: pages are read when touched)."""
        return {field: self._open(split, field) for field in sorted(fields)}

    def allocate(self, split: str, num_samples: int, specs: dict[str, FieldSpec]) -> None:
        """Lay out the partial file of each field (header and room for every row), replacing stale ones."""
        for field, spec in specs.items():
            path = self.partial_path(split, field)
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a killed run's file: open_memmap would keep its written pages
            layout = np.lib.format.open_memmap(
                path, mode="w+", dtype=spec.numpy_dtype, shape=(num_samples, *spec.shape)
            )
            del layout  # nothing written: the rows stay sparse until each process writes its own

    def writers(self, split: str, num_samples: int, specs: dict[str, FieldSpec]) -> dict[str, RowWriter]:
        return {field: RowWriter(self.partial_path(split, field), spec, num_samples) for field, spec in specs.items()}

    def commit(self, split: str, fields: set[str]) -> None:
        """Write each field's provenance, then rename its finished file into place (every rank wrote its rows)."""
        for field in sorted(fields):
            write_json_atomic(self.provenance_path(split, field), self._meta(split, field))
            os.replace(self.partial_path(split, field), self.path(split, field))

    def discard(self, split: str, fields: set[str]) -> None:
        """Remove partial files (a failed or interrupted extraction)."""
        for field in fields:
            with contextlib.suppress(FileNotFoundError):
                self.partial_path(split, field).unlink()

    def remove_old_stores(self) -> list[Path]:
        """Delete the stores under this store's root that hold safetensors files (format 3); returns their folders."""
        old = sorted({path.parents[1] for path in self.root.glob("*/*/*.safetensors")})
        for folder in old:
            shutil.rmtree(folder)
        return old
