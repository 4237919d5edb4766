"""The feature cache: one file per split, keyed by the backbone's weights and the data config.

``<cache_dir>/<key>/<split>.pt`` where ``key`` hashes the weights fingerprint together with
everything that decides which images and targets a split holds. The file also stores both
halves of its key, and a file whose stored fingerprint or data config differs from the
expected one is an error, never silently reused (a copied or hand-moved cache folder).
Files are written to a temporary name and renamed, so an interrupted run leaves no half file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from regablate.errors import RegablateError
from regablate.probe.features import FeatureSet

FORMAT = 1


def cache_key(fingerprint: str, data_config: dict[str, Any]) -> str:
    """A short stable hash of the backbone fingerprint and the data config."""
    text = json.dumps({"format": FORMAT, "weights": fingerprint, "data": data_config}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class FeatureCache:
    """Load and store the :class:`FeatureSet` of each split for one backbone and data config."""

    def __init__(self, root: str | Path, fingerprint: str, data_config: dict[str, Any]) -> None:
        self.fingerprint = fingerprint
        self.data_config = json.loads(json.dumps(data_config, sort_keys=True, default=str))
        self.folder = Path(root) / cache_key(fingerprint, self.data_config)

    def path(self, split: str) -> Path:
        return self.folder / f"{split}.pt"

    def load(self, split: str) -> FeatureSet | None:
        """The cached features of ``split``, or ``None`` when there are none yet."""
        path = self.path(split)
        if not path.is_file():
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            meta, tensors = stored["meta"], stored["tensors"]
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
            raise RegablateError(f"cannot read probe cache {path} ({type(err).__name__}); delete it to recompute") from None
        if meta.get("weights") != self.fingerprint:
            raise RegablateError(
                f"probe cache {path} was written by another backbone (weights {str(meta.get('weights'))[:12]}, "
                f"this one {self.fingerprint[:12]}); delete {self.folder} to recompute"
            )
        if meta.get("data") != self.data_config or meta.get("split") != split:
            raise RegablateError(f"probe cache {path} was written for other data; delete {self.folder} to recompute")
        return FeatureSet(**tensors)

    def store(self, split: str, features: FeatureSet) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "weights": self.fingerprint, "data": self.data_config, "split": split}
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{split}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save({"meta": meta, "tensors": features.to_dict()}, tmp)
            os.replace(tmp, self.path(split))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
