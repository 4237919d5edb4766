"""One probe run: features of each split (from the cache or one backbone pass), heads, outputs.

Outputs in ``output_dir``: the ``probe/...`` metrics merged into ``summary.json``,
``probe.json`` with the protocol behind them, and TensorBoard events under ``probe/``.
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import Any

from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter

from regablate.errors import RegablateError
from regablate.models.fingerprint import weights_fingerprint
from regablate.probe.cache import FeatureCache
from regablate.probe.dinov2.runner import run_dinov2
from regablate.probe.features import Extractor, FeatureSet, extract_split
from regablate.probe.protocol import LinearProbe, ProbeReport
from regablate.runs import read_summary, update_summary, write_json_atomic

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# The headline metric of each probe.
PROBE_METRICS = {
    "cls": "probe/cls_top1",
    "seg": "probe/seg_miou",
    "depth": "probe/depth_rmse",
    "lost": "probe/lost_corloc",
}
PROBE_FILE = "probe.json"
CACHE_FOLDER = "probe_cache"


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


def load_features(
    extractor: Extractor,
    datamodule: LightningDataModule,
    cache: FeatureCache | None,
    splits_wanted: tuple[str, ...] = SPLITS,
) -> dict[str, FeatureSet]:
    """Features of ``splits_wanted``: read from ``cache`` where present, else extracted and stored."""
    hparams = getattr(datamodule, "hparams", {})
    splits = {}
    for split in splits_wanted:
        features = cache.load(split) if cache is not None else None
        if features is None:
            loader = DataLoader(
                frozen_dataset(datamodule, split),
                batch_size=hparams.get("batch_size", 64),
                num_workers=hparams.get("num_workers", 0),
                shuffle=False,
            )
            started = time.perf_counter()
            features = extract_split(extractor, loader, keep_keys=split == "test")
            log.info("extracted %d %s samples in %.1f s", len(features.cls), split, time.perf_counter() - started)
            if cache is not None:
                cache.store(split, features)
        else:
            log.info("read %d %s samples from %s", len(features.cls), split, cache.path(split))
        splits[split] = features
    return splits


def run_probe(
    extractor: Extractor,
    datamodule: LightningDataModule,
    probe: LinearProbe,
    *,
    output_dir: str | Path,
    patch_size: tuple[int, int],
    data_config: dict[str, Any],
    use_cache: bool = True,
    source: dict[str, Any] | None = None,
    dataset: str | None = None,
) -> ProbeReport:
    """Probe ``extractor``'s frozen features on ``datamodule`` and write the results to ``output_dir``.

    ``data_config`` (with the extractor's weights) keys the feature cache in
    ``output_dir/probe_cache``; ``source`` describes the backbone in ``probe.json``; ``dataset``
    names the data in the summary (``probe/<probe>_dataset``; default: from ``data_config``).
    The dinov2 protocol reads ``extractor.model`` (a ``ViTExtractor``'s backbone).
    """
    output_dir = Path(output_dir)
    fingerprint = weights_fingerprint(extractor) if hasattr(extractor, "state_dict") else None
    cache = None
    if use_cache:
        if fingerprint is None:
            raise RegablateError(
                "the feature cache needs an extractor with weights (an nn.Module); pass use_cache=False"
            )
        cache = FeatureCache(output_dir / CACHE_FOLDER, fingerprint, data_config)
    started = time.perf_counter()
    if probe.protocol == "dinov2":
        report = run_dinov2(
            extractor.model,
            datamodule,
            probe.dinov2,
            probes=probe.probes,
            seed=probe.seed,
            ignore_index=probe.ignore_index,
        )
        if "lost" in probe.probes:  # LOST trains nothing: its one protocol, on the test split's features
            test = load_features(extractor, datamodule, cache, ("test",))["test"]
            if test.box is None:
                report.skipped["lost"] = "the data have no 'box' in test"
                log.warning("skipping the lost probe: %s", report.skipped["lost"])
            else:
                probe.lost(test, patch_size, report)
    else:
        splits = load_features(extractor, datamodule, cache)
        report = probe.run(
            splits,
            patch_size=patch_size,
            num_classes=getattr(datamodule, "num_classes", None),
            num_seg_classes=getattr(datamodule, "num_seg_classes", None),
        )
    report.metrics.update(dataset_keys(report.metrics, dataset or data_name(data_config)))
    report.metrics["probe/seconds"] = round(time.perf_counter() - started, 3)
    write_outputs(output_dir, report, {"source": source or {}, "data": data_config, "weights": fingerprint})
    return report


def data_name(data_config: dict[str, Any]) -> str:
    """A name for the probed data: a data module's ``path`` (and ``name``), else its class name."""
    args = data_config.get("init_args") or {}
    if args.get("path"):
        return f"{args['path']}:{args['name']}" if args.get("name") else str(args["path"])
    return str(data_config.get("class_path", "unknown")).rpartition(".")[2]


def dataset_keys(metrics: dict[str, Any], name: str) -> dict[str, str]:
    """``probe/<probe>_dataset``: the data each probe that ran was measured on (the report matches it to the paper)."""
    return {f"probe/{probe}_dataset": name for probe, key in PROBE_METRICS.items() if key in metrics}


def write_outputs(output_dir: Path, report: ProbeReport, details: dict[str, Any]) -> None:
    """``summary.json`` (merged), ``probe.json`` and TensorBoard scalars + protocol text under ``probe/``."""
    step = int(read_summary(output_dir).get("global_step") or 0)
    update_summary(output_dir, report.metrics)
    write_json_atomic(
        output_dir / PROBE_FILE,
        {**details, "metrics": report.metrics, "protocol": report.protocol, "skipped": report.skipped},
    )
    writer = SummaryWriter(str(output_dir / "probe"))
    try:
        for name, value in report.metrics.items():
            if isinstance(value, (int, float)):
                writer.add_scalar(name, value, global_step=step)
        lines = [f"{name}: {value}" for name, value in sorted(report.metrics.items())]
        lines += [f"skipped {probe}: {why}" for probe, why in report.skipped.items()]
        writer.add_text("probe/protocol", "  \n".join(lines), global_step=step)
    finally:
        writer.close()
