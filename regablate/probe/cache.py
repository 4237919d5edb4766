"""The feature cache: one safetensors file per split, keyed by the backbone's weights and the data config.

``<cache_dir>/<key>/<split>.safetensors`` where ``key`` hashes the weights fingerprint together
with everything that decides which images and targets a split holds. The file's metadata also
stores both halves of its key, and a file whose stored fingerprint or data config differs from
the expected one is an error, never silently reused (a copied or hand-moved cache folder).
safetensors holds plain tensors only (nothing is unpickled on read); files are written to a
temporary name and renamed, so an interrupted run leaves no half file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from regablate.errors import RegablateError
from regablate.probe.features import FeatureSet
from regablate.runs import atomic_path

FORMAT = 2
META_KEY = "regablate"  # the safetensors metadata entry that holds the cache key


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
        return self.folder / f"{split}.safetensors"

    def load(self, split: str) -> FeatureSet | None:
        """The cached features of ``split``, or ``None`` when there are none yet."""
        path = self.path(split)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {})[META_KEY])
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
            raise RegablateError(
                f"cannot read probe cache {path} ({type(err).__name__}); delete it to recompute"
            ) from None
        if meta.get("weights") != self.fingerprint:
            raise RegablateError(
                f"probe cache {path} was written by another backbone (weights {str(meta.get('weights'))[:12]}, "
                f"this one {self.fingerprint[:12]}); delete {self.folder} to recompute"
            )
        if meta.get("data") != self.data_config or meta.get("split") != split:
            raise RegablateError(f"probe cache {path} was written for other data; delete {self.folder} to recompute")
        return FeatureSet(**tensors)

    def store(self, split: str, features: FeatureSet) -> None:
        meta = {"format": FORMAT, "weights": self.fingerprint, "data": self.data_config, "split": split}
        tensors = {key: value.contiguous() for key, value in features.to_dict().items()}
        with atomic_path(self.path(split)) as tmp:
            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})
