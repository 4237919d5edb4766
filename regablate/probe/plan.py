"""What a probe will extract, before it extracts anything: per split, the samples, the fields and the bytes.

The plan reads the first sample of each split (so data that cannot load fail here, in one line,
before any process starts), runs the backbone on one image (the fields' shapes), asks the probe
which fields each split needs (``LinearProbe.fields``, ``regablate.probe.settings``: CLS and the mean
patch for classification, patch tokens only for the dense probes, keys only where LOST runs, only the targets the probes
read) and the feature store which of them it already holds. ``regablate probe --dry_run true``
prints it; the run checks the free disk space against it.
"""

from __future__ import annotations

import inspect
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from lightning import LightningDataModule
from torch.utils.data import Dataset

from regablate.data.common import num_samples
from regablate.errors import RegablateError
from regablate.probe.cache import FeatureCache, FieldSpec
from regablate.probe.device import ProbeDevice
from regablate.probe.features import FEATURE_DTYPES, TARGET_KEYS, Extractor, feature_specs
from regablate.probe.settings import LinearProbe
from regablate.runs import first_line

SPLITS = ("train", "val", "test")
TARGET_DTYPES = {"label": torch.int64, "depth": torch.float32, "box": torch.float32}


@dataclass
class SplitPlan:
    """One split: its dataset, the fields it needs (``specs``) and those the store already holds (``cached``)."""

    split: str
    dataset: Dataset
    specs: dict[str, FieldSpec]
    cached: set[str]

    @property
    def num_samples(self) -> int:
        return num_samples(self.dataset)

    @property
    def missing(self) -> dict[str, FieldSpec]:
        return {name: spec for name, spec in self.specs.items() if name not in self.cached}

    def nbytes(self, fields: dict[str, FieldSpec] | None = None) -> int:
        return sum(spec.nbytes(self.num_samples) for spec in (self.specs if fields is None else fields).values())


@dataclass
class ProbePlan:
    """Every split a probe reads, where its features are stored, and how it is scored."""

    splits: dict[str, SplitPlan]
    cache: FeatureCache
    scored_on: str
    skipped: dict[str, str]
    reuse: bool

    @property
    def to_write(self) -> int:
        return sum(split.nbytes(split.missing) for split in self.splits.values())

    def with_cache(self, cache: FeatureCache) -> ProbePlan:
        """The same plan against another key (the weights changed: a test-time register was added)."""
        splits = {
            name: replace(split, cached=cache.cached(name, set(split.specs)) if self.reuse else set())
            for name, split in self.splits.items()
        }
        return replace(self, splits=splits, cache=cache)

    def check_disk_space(self) -> None:
        """Refuse to start an extraction whose files the disk cannot hold."""
        folder = _existing_parent(self.cache.folder)
        free = shutil.disk_usage(folder).free
        if self.to_write > free:
            raise RegablateError(
                f"the probe's features need {human_bytes(self.to_write)} in {self.cache.folder}, but only "
                f"{human_bytes(free)} is free on that disk; free some space or use another --output"
            )

    def summary(self) -> dict[str, Any]:
        """Per split: samples, fields and bytes (for probe.json)."""
        return {
            name: {"samples": split.num_samples, "fields": sorted(split.specs), "bytes": split.nbytes()}
            for name, split in self.splits.items()
        }

    def describe(self, where: ProbeDevice | None = None, cache_known: bool = True) -> str:
        lines = [f"{'split':<6} {'samples':>9}  {'bytes':>9}  {'state':<12} fields"]
        for name, split in self.splits.items():
            missing = split.missing
            state = "cached" if not missing else "to extract" if len(missing) == len(split.specs) else "partly cached"
            if not cache_known:
                state = "?"
            lines.append(
                f"{name:<6} {split.num_samples:>9}  {human_bytes(split.nbytes()):>9}  {state:<12} "
                + ", ".join(split.specs)
            )
        skipped = "; ".join(f"{probe} ({why})" for probe, why in self.skipped.items()) or "none"
        store = "kept" if self.reuse else "deleted after the probe (--cache false)"
        lines += [
            f"scored on: {self.scored_on}" + ("" if self.scored_on == "test" else " (the data have no test split)"),
            f"skipped probes: {skipped}",
            f"feature store: {self.cache.folder} ({store}); "
            + (f"{human_bytes(self.to_write)} to write" if cache_known else "its state is known after the search"),
        ]
        if where is not None:
            lines.append(f"device: {where.describe()}")
        return "\n".join(lines)


def frozen_dataset(datamodule: LightningDataModule, split: str) -> Dataset:
    """``split`` of a regablate data module, without training augmentation where it has any.

    Features are extracted once and reused for every epoch, so random crops would only freeze
    one random draw; HFDataModule takes ``augment=False`` for its eval transform. The
    synthetic scenes' seeded flips are fixed per sample and stay.
    """
    dataset_of = getattr(datamodule, "dataset", None)
    if not callable(dataset_of):
        raise RegablateError(
            f"{type(datamodule).__name__} has no dataset(split) method; probes need a regablate data module "
            "(SyntheticScenes or HFDataModule)"
        )
    if "augment" in inspect.signature(dataset_of).parameters:
        return dataset_of(split, augment=False)
    return dataset_of(split)


def has_split(datamodule: LightningDataModule, split: str) -> bool:
    """Whether the data module has ``split`` (modules without ``has_split`` have every split)."""
    answer = getattr(datamodule, "has_split", None)
    return bool(answer(split)) if callable(answer) else True


def plan_probe(
    extractor: Extractor,
    datamodule: LightningDataModule,
    probe: LinearProbe,
    cache: FeatureCache,
    *,
    reuse: bool = True,
    where: ProbeDevice | None = None,
) -> ProbePlan:
    """The plan of probing ``extractor`` on ``datamodule`` (reads one sample per split, runs one image)."""
    for split in ("train", "val"):
        if not has_split(datamodule, split):
            raise RegablateError(f"the data have no {split} split; probes train on train and select on val")
    scored_on = "test" if has_split(datamodule, "test") else "val"
    first: dict[str, dict[str, Any]] = {}
    datasets: dict[str, Dataset] = {}
    for split in SPLITS:
        if split == "test" and scored_on != "test":
            continue
        datasets[split] = frozen_dataset(datamodule, split)
        first[split] = _first_sample(datasets[split], split)
    targets = {split: {key for key in TARGET_KEYS if key in sample} for split, sample in first.items()}
    skipped = probe.missing_targets(targets, scored_on)
    fields = {split: probe.fields(split, scored_on, skipped) for split in datasets}
    features = feature_specs(extractor, first["train"]["image"], where)
    mask_dtype = mask_storage_dtype(getattr(datamodule, "num_seg_classes", None), probe.ignore_index)
    splits = {}
    for split, names in fields.items():
        if not names:
            continue  # e.g. val when only dense probes run on a test split
        specs = {
            name: features[name] if name in FEATURE_DTYPES else _target_spec(name, first[split][name], mask_dtype)
            for name in sorted(names, key=[*FEATURE_DTYPES, *TARGET_KEYS].index)
        }
        cached = cache.cached(split, set(specs)) if reuse else set()
        splits[split] = SplitPlan(split, datasets[split], specs, cached)
    return ProbePlan(splits=splits, cache=cache, scored_on=scored_on, skipped=skipped, reuse=reuse)


def mask_storage_dtype(num_seg_classes: int | None, ignore_index: int | None) -> torch.dtype:
    """uint8 when the data module declares classes (and an ignore value) that fit it, else int32."""
    fits = num_seg_classes is not None and num_seg_classes <= 256
    return torch.uint8 if fits and (ignore_index is None or 0 <= ignore_index <= 255) else torch.int32


def _target_spec(name: str, value: Any, mask_dtype: torch.dtype) -> FieldSpec:
    return FieldSpec(tuple(torch.as_tensor(value).shape), mask_dtype if name == "mask" else TARGET_DTYPES[name])


def _first_sample(dataset: Dataset, split: str) -> dict[str, Any]:
    if num_samples(dataset) == 0:
        raise RegablateError(f"the {split} split holds no samples: nothing to probe")
    try:
        sample = dataset[0]
    except RegablateError:
        raise
    except Exception as err:
        raise RegablateError(
            f"cannot load the first {split} sample ({type(err).__name__}: {first_line(err)}); check --data"
        ) from None
    if "image" not in sample:
        raise RegablateError(f"the {split} samples have no 'image' (keys: {', '.join(sample)})")
    return sample


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def human_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")
