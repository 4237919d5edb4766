"""The feature store: one safetensors file per split and field, written in chunks, memory-mapped on read.

``<root>/<key>/<split>/<field>.safetensors`` (``cls``, ``mean_patch``, ``patches``, ``keys`` and
the targets ``label``, ``mask``, ``depth``, ``box``), where ``key`` hashes the weights fingerprint
together with the data config and the precision of the extraction. Each file holds one tensor of
all the split's samples, so a split's features never have to fit in memory:

* writing: :meth:`FeatureCache.allocate` lays out the file (safetensors header, then space for
  every row) under a hidden partial name; each process writes the rows of its own samples into it
  (:class:`RowWriter`, ``pwrite`` at the rows' offsets), batch by batch; :meth:`commit` renames it
  into place once every rank is done. safetensors has no incremental writer, so the header is
  written here, to its published format (8-byte little-endian header length, a JSON header padded
  with spaces, then the data); reading is safetensors' own ``safe_open``, which memory-maps.
* reading: :meth:`load` gives tensors backed by the files' pages (nothing is unpickled, and only the
  rows a head touches are read from disk). A file's metadata stores its key; one whose weights or
  data config differ from the expected ones is an error, never silently reused.

A run reuses whatever fields its splits already have and extracts only the missing ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from regablate.errors import RegablateError

FORMAT = 3
META_KEY = "regablate"  # the safetensors metadata entry that holds the cache key
SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class FieldSpec:
    """Shape (per sample) and dtype of one stored field."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

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
        self._fd = os.open(path, os.O_WRONLY)
        with open(path, "rb") as handle:
            self._data_start = 8 + struct.unpack("<Q", handle.read(8))[0]

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
        data = rows.detach().to("cpu", self.spec.dtype).contiguous().view(torch.uint8).numpy()
        view, offset = data.data.cast("B"), self._data_start + first_row * self.spec.row_bytes
        while view:  # pwrite may write less than asked (very large writes)
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def close(self) -> None:
        os.close(self._fd)


class FeatureCache:
    """The fields of each split for one backbone, data config and precision."""

    def __init__(self, root: str | Path, fingerprint: str, data_config: dict[str, Any], precision: str) -> None:
        self.fingerprint = fingerprint
        self.data_config = json.loads(json.dumps(data_config, sort_keys=True, default=str))
        self.precision = precision
        self.folder = Path(root) / cache_key(fingerprint, self.data_config, precision)

    def path(self, split: str, field: str) -> Path:
        return self.folder / split / f"{field}.safetensors"

    def partial_path(self, split: str, field: str) -> Path:
        return self.folder / split / f".{field}.partial.safetensors"

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
        """Which of ``fields`` the cache holds for ``split`` (each file's key checked)."""
        found = set()
        for field in fields:
            if self.path(split, field).is_file():
                self._open(split, field)  # raises on a file of another backbone or other data
                found.add(field)
        return found

    def _open(self, split: str, field: str) -> Tensor:
        path = self.path(split, field)
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {})[META_KEY])
                tensor = handle.get_tensor(field)
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
        if any(meta.get(k) != expected[k] for k in ("data", "precision", "split", "field")):
            raise RegablateError(f"probe cache {path} was written for other data; delete {self.folder} to recompute")
        return tensor

    def load(self, split: str, fields: set[str]) -> dict[str, Tensor]:
        """The stored tensors of ``fields`` (memory-mapped: pages are read when touched)."""
        return {field: self._open(split, field) for field in sorted(fields)}

    def allocate(self, split: str, num_samples: int, specs: dict[str, FieldSpec]) -> None:
        """Lay out the partial file of each field (header and room for every row), replacing stale ones."""
        for field, spec in specs.items():
            path = self.partial_path(split, field)
            path.parent.mkdir(parents=True, exist_ok=True)
            entry = {
                "dtype": SAFETENSORS_DTYPES[spec.dtype],
                "shape": [num_samples, *spec.shape],
                "data_offsets": [0, spec.nbytes(num_samples)],
            }
            meta = json.dumps(self._meta(split, field), sort_keys=True)
            header = json.dumps({"__metadata__": {META_KEY: meta}, field: entry}).encode()
            header += b" " * (-len(header) % 8)  # the data start 8-byte aligned, as safetensors writes it
            with open(path, "wb") as handle:
                handle.write(struct.pack("<Q", len(header)) + header)
                handle.truncate(8 + len(header) + spec.nbytes(num_samples))  # sparse until written

    def writers(self, split: str, num_samples: int, specs: dict[str, FieldSpec]) -> dict[str, RowWriter]:
        return {field: RowWriter(self.partial_path(split, field), spec, num_samples) for field, spec in specs.items()}

    def commit(self, split: str, fields: set[str]) -> None:
        """Rename the finished partial files into place (after every rank wrote its rows)."""
        for field in sorted(fields):
            os.replace(self.partial_path(split, field), self.path(split, field))

    def discard(self, split: str, fields: set[str]) -> None:
        """Remove partial files (a failed or interrupted extraction)."""
        for field in fields:
            with contextlib.suppress(FileNotFoundError):
                self.partial_path(split, field).unlink()
