"""One probe run: the plan, the missing features extracted on the probe's devices, heads, outputs.

Extraction is split over the ranks of a :class:`ProbeDevice` by whole batches (rank r takes a
contiguous run of the split's batches), so every batch holds the same samples on any number of
devices and the features do not depend on the device count. Each rank writes its rows into the
feature store's files; rank 0 renames them into place once every rank is done, trains the heads on
its device and writes the outputs.

Outputs in ``output_dir``: the ``probe/...`` metrics merged into ``summary.json``,
``probe.json`` with the protocol behind them, and TensorBoard events under ``probe/``.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning import LightningDataModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, default_collate
from torch.utils.tensorboard import SummaryWriter

from regablate.errors import RegablateError
from regablate.models.fingerprint import weights_fingerprint
from regablate.models.layout import is_backbone
from regablate.probe.cache import FeatureCache
from regablate.probe.device import ProbeDevice
from regablate.probe.dinov2.runner import run_dinov2
from regablate.probe.features import TARGET_KEYS, Extractor, FeatureSet, extract_split
from regablate.probe.plan import ProbePlan, SplitPlan, plan_probe
from regablate.probe.protocol import ProbeReport, run_heads
from regablate.probe.settings import LinearProbe
from regablate.progress import Progress
from regablate.runs import RunRecord, first_line, write_json_atomic

log = logging.getLogger(__name__)

# The headline metric of each probe (on a test split; ``probe/<probe>_val_<metric>`` when scored on val).
PROBE_METRICS = {"cls": "cls_top1", "seg": "seg_miou", "depth": "depth_rmse", "lost": "lost_corloc"}
PROBE_FILE = "probe.json"
CACHE_FOLDER = "probe_cache"
SCRATCH_FOLDER = ".probe_features"  # the feature store of a run with --cache false, deleted after it


def feature_store(
    extractor: Extractor, output_dir: str | Path, data_config: dict[str, Any], precision: str, use_cache: bool
) -> FeatureCache:
    """The store of ``extractor``'s features: ``output_dir/probe_cache``, or a scratch folder without the cache."""
    if not isinstance(extractor, nn.Module):
        raise RegablateError("the feature store needs an extractor with weights (an nn.Module) to key its files")
    root = Path(output_dir) / (CACHE_FOLDER if use_cache else SCRATCH_FOLDER)
    return FeatureCache(root, weights_fingerprint(extractor), data_config, precision)


def extraction_batch_size(datamodule: LightningDataModule) -> int:
    """Images per extraction batch: the data's ``batch_size`` (64 when they have none)."""
    return int(getattr(datamodule, "hparams", {}).get("batch_size", 64))


def extract_missing(
    extractor: Extractor, datamodule: LightningDataModule, plan: ProbePlan, where: ProbeDevice
) -> dict[str, float]:
    """Extract every field the store lacks, each rank its share of the batches; returns seconds per split."""
    batch_size, workers = extraction_batch_size(datamodule), getattr(datamodule, "hparams", {}).get("num_workers", 0)
    seconds = {}
    for name, split in plan.splits.items():
        missing = split.missing
        if not missing:
            if where.is_main:
                print(f"probe: {name}: {split.num_samples} samples read from {plan.cache.folder}", flush=True)
            continue
        if where.is_main:
            plan.cache.allocate(name, split.num_samples, missing)
        where.barrier()
        seconds[name] = _extract_share(extractor, split, plan.cache, where, batch_size, workers)
        where.barrier()
        if where.is_main:
            plan.cache.commit(name, set(missing))
    return seconds


def _extract_share(
    extractor: Extractor, split: SplitPlan, cache: FeatureCache, where: ProbeDevice, batch_size: int, workers: int
) -> float:
    batches = where.shard(-(-split.num_samples // batch_size))
    rows = range(batches.start * batch_size, min(batches.stop * batch_size, split.num_samples))
    loader = DataLoader(
        Subset(split.dataset, rows),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=where.pin_memory,
        collate_fn=KeptKeys(["image", *(name for name in split.missing if name in TARGET_KEYS)]),
    )
    share = f", rank 0's share of {where.world_size}" if where.world_size > 1 else ""
    label = f"probe: extracting {split.split} ({', '.join(split.missing)}) on {where.describe()}{share}"
    progress = Progress(label, len(rows), enabled=where.is_main)
    writers = cache.writers(split.split, split.num_samples, split.missing)
    extract_split(extractor, _loaded(loader, split.split, rows), writers, rows.start, where, progress)
    return progress.finish()


class KeptKeys:
    """Collate only the sample keys the extraction stores (a cls-only probe never batches masks or depth maps).

    A class, not a closure, so loader workers can pickle it.
    """

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Tensor]:
        return default_collate([{key: sample[key] for key in self.keys} for sample in samples])


def _loaded(loader: DataLoader, split: str, rows: range) -> Iterator[dict[str, Tensor]]:
    """The loader's batches; a sample that does not load is one line naming the split and the rows."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as err:
            raise RegablateError(
                f"cannot load a {split} sample in rows {rows.start}..{rows.stop - 1} "
                f"({type(err).__name__}: {first_line(err)}); check --data"
            ) from None
        yield batch


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
    where: ProbeDevice | None = None,
    plan: ProbePlan | None = None,
    summary: dict[str, Any] | None = None,
    dataset: str | None = None,
) -> ProbeReport | None:
    """Probe ``extractor``'s frozen features on ``datamodule`` and write the results to ``output_dir``.

    ``data_config`` (with the extractor's weights and the precision) keys the feature store in
    ``output_dir/probe_cache``; ``source`` describes the backbone in ``probe.json``; ``summary``
    adds keys to ``summary.json``; ``dataset`` names the data there (``probe/<probe>_dataset``,
    default: from ``data_config``). With several devices (``where``, already launched) every rank
    extracts its share and only rank 0 trains the heads, writes the outputs and returns the report.

    ``probe.protocol == "dinov2"`` runs DINOv2's protocols on ``extractor.model`` (a
    ``ViTExtractor``'s backbone) on ``where``'s device and autocast, after the cached part (LOST).
    """
    where = where or ProbeDevice(accelerator="cpu", devices=1, precision="32-true")
    check_protocol_devices(probe, where)
    output_dir = Path(output_dir)
    cache = feature_store(extractor, output_dir, data_config, where.resolved_precision, use_cache)
    if where.broadcast(cache.fingerprint) != cache.fingerprint:
        raise RegablateError(f"rank {where.rank} built other weights than rank 0; its features would not match")
    if plan is None:
        plan = plan_probe(extractor, datamodule, probe, cache, reuse=use_cache, where=where)
    elif plan.cache.folder != cache.folder:  # other weights than planned for: a test-time register was added
        plan = plan.with_cache(cache)
    started = time.perf_counter()
    try:
        if where.is_main:
            if not use_cache:
                shutil.rmtree(cache.folder.parent, ignore_errors=True)  # a scratch store a killed run left
            for old in cache.remove_old_stores():
                print(f"probe: removed {old}, a feature store of an older format (extracted again)", flush=True)
            plan.check_disk_space()
        extract_missing(extractor, datamodule, plan, where)
        if not where.is_main:
            return None
        splits = {name: FeatureSet(**cache.load(name, set(split.specs))) for name, split in plan.splits.items()}
        report = run_heads(
            probe,
            splits,
            patch_size=patch_size,
            num_classes=getattr(datamodule, "num_classes", None),
            num_seg_classes=getattr(datamodule, "num_seg_classes", None),
            scored_on=plan.scored_on,
            device=where.device,
        )
        if probe.protocol == "dinov2":
            report = merged(report, _run_dinov2(extractor, datamodule, probe, plan.scored_on, where))
    except BaseException:
        if where.is_main:
            for name, split in plan.splits.items():
                cache.discard(name, set(split.missing))
            _remove_empty_folders(cache.folder, up_to=output_dir.parent)
        raise
    finally:
        if where.is_main and not use_cache:
            shutil.rmtree(cache.folder.parent, ignore_errors=True)
    report.skipped = {**plan.skipped, **report.skipped}
    report.metrics.update(dataset_keys(report.metrics, dataset or data_name(data_config)))
    report.metrics["probe/seconds"] = round(time.perf_counter() - started, 3)
    details = {
        "source": source or {},
        "data": data_config,
        "weights": cache.fingerprint,
        "device": where.describe(),
        "features": plan.summary(),
    }
    write_outputs(output_dir, report, details, summary or {})
    return report


def check_protocol_devices(probe: LinearProbe, where: ProbeDevice) -> None:
    """The dinov2 protocol trains with the backbone in the loop on one device (rank 0's); refuse more."""
    if probe.protocol == "dinov2" and where.world_size > 1:
        raise RegablateError(f"--probe.protocol dinov2 runs on one device, not {where.world_size}; use --devices 1")


def _run_dinov2(
    extractor: Extractor, datamodule: LightningDataModule, probe: LinearProbe, scored_on: str, where: ProbeDevice
) -> ProbeReport:
    model = getattr(extractor, "model", None)
    if not is_backbone(model):
        raise RegablateError("--probe.protocol dinov2 trains its heads on a timm ViT's blocks: give it a ViT backbone")
    return run_dinov2(
        model,
        datamodule,
        probe.dinov2_settings,
        probes=probe.probes,
        seed=probe.seed,
        ignore_index=probe.ignore_index,
        scored_on=scored_on,
        device=where.device,
        autocast=where.autocast,
    )


def merged(cached: ProbeReport, dinov2: ProbeReport) -> ProbeReport:
    """The report of the cached probes (LOST) and of the dinov2 protocols together; dinov2's settings win."""
    return ProbeReport(
        metrics={**cached.metrics, **dinov2.metrics},
        protocol={**cached.protocol, **dinov2.protocol},
        skipped={**cached.skipped, **dinov2.skipped},
    )


def data_name(data_config: dict[str, Any]) -> str:
    """A name for the probed data: a data module's ``path`` (and ``name``), else its class name."""
    args = data_config.get("init_args") or {}
    if args.get("path"):
        return f"{args['path']}:{args['name']}" if args.get("name") else str(args["path"])
    return str(data_config.get("class_path", "unknown")).rpartition(".")[2]


def dataset_keys(metrics: dict[str, Any], name: str) -> dict[str, str]:
    """``probe/<probe>_dataset``: the data each probe that ran was measured on (the report matches it to the paper)."""
    ran = [
        probe
        for probe, metric in PROBE_METRICS.items()
        if f"probe/{metric}" in metrics or f"probe/{metric.replace('_', '_val_', 1)}" in metrics
    ]
    return {f"probe/{probe}_dataset": name for probe in ran}


def _remove_empty_folders(folder: Path, up_to: Path) -> None:
    """Remove the empty folders a failed run left: those under ``folder``, then its empty parents below ``up_to``."""
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True) if folder.is_dir() else []:
        with contextlib.suppress(OSError):
            path.rmdir()
    while folder != up_to and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def write_outputs(output_dir: Path, report: ProbeReport, details: dict[str, Any], summary: dict[str, Any]) -> None:
    """``summary.json`` (merged), ``probe.json`` and TensorBoard scalars + protocol text under ``probe/``."""
    record = RunRecord(output_dir)
    step = int(record.read().get("global_step") or 0)
    record.update({**summary, **report.metrics})
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
