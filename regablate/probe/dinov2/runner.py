"""``--probe.protocol dinov2``: the three protocols on one backbone and data module, into one report.

Which probes run follows ``probes`` and the targets the data hold (a probe whose targets are
missing is skipped with the reason, as in the fast protocol). Classification trains on train,
picks its head on val and reports the scored split; segmentation and depth train on train and
report the scored split: ``scored_on`` is test, or val for data without a test split (then under
the fast protocol's ``probe/<probe>_val_<metric>`` keys, ``regablate.probe.protocol.scored_key``).
Everything is seeded by ``seed``; the backbone and the heads run on ``device`` (the probe's
``ProbeDevice``), the backbone under its ``autocast``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from lightning import LightningDataModule
from torch.utils.data import Dataset

from regablate.data.common import num_samples
from regablate.errors import RegablateError
from regablate.hparams import plain
from regablate.models.layout import Backbone
from regablate.probe.dinov2.backbone import Autocast, FrozenBackbone
from regablate.probe.dinov2.classification import classify
from regablate.probe.dinov2.data import normalisation, raw_dataset
from regablate.probe.dinov2.depth import estimate_depth
from regablate.probe.dinov2.segmentation import segment
from regablate.probe.dinov2.settings import DINOv2Settings
from regablate.probe.protocol import NEEDS, ProbeReport

log = logging.getLogger(__name__)

PROBES = ("cls", "seg", "depth")  # the protocols of DINOv2 (LOST has one protocol for both: the fast one)


def missing_targets(raw: dict[str, Dataset], probes: Sequence[str]) -> dict[str, str]:
    """Probes whose targets a split lacks -> why (read from each split's first sample)."""
    empty = [split for split in raw if num_samples(raw[split]) == 0]
    if empty:
        raise RegablateError(f"the {', '.join(empty)} split holds no samples: nothing to probe")
    first = {split: dataset[0] for split, dataset in raw.items()}
    skipped = {}
    for probe in probes:
        lacking = [split for split in raw if NEEDS[probe] not in first[split]]
        if lacking:
            skipped[probe] = f"the data have no '{NEEDS[probe]}' in {', '.join(lacking)}"
    return skipped


def run_dinov2(
    model: Backbone,
    datamodule: LightningDataModule,
    settings: DINOv2Settings,
    *,
    probes: Sequence[str],
    seed: int = 0,
    ignore_index: int | None = 255,
    scored_on: str = "test",
    device: torch.device | None = None,
    autocast: Autocast | None = None,
) -> ProbeReport:
    """DINOv2's classification, segmentation and depth protocols (those of ``probes``) on ``model``."""
    if getattr(model, "cls_token", None) is None:
        raise RegablateError(
            "the dinov2 protocol reads the class token (DINOv2's heads are on CLS), which this backbone has none of; "
            "use --probe.protocol fast"
        )
    backbone = FrozenBackbone(model, device, autocast)
    wanted = [probe for probe in PROBES if probe in probes]
    if "cls" in wanted and max(settings.cls_n_last_blocks) > backbone.depth:
        raise RegablateError(
            f"cls_n_last_blocks {list(settings.cls_n_last_blocks)} asks for more blocks than the backbone's "
            f"{backbone.depth}; set --probe.dinov2.cls_n_last_blocks to values up to {backbone.depth}"
        )
    raw = {split: raw_dataset(datamodule, split) for split in dict.fromkeys(("train", "val", scored_on))}
    report = ProbeReport(skipped=missing_targets(raw, wanted))
    for probe, reason in report.skipped.items():
        log.warning("skipping the %s probe: %s", probe, reason)
    scale = settings.scale_for(int(model.patch_embed.img_size[0]))
    common: dict[str, Any] = {
        "scale": scale,
        "normalisation": normalisation(datamodule),
        "seed": seed,
        "num_workers": int(getattr(datamodule, "hparams", {}).get("num_workers", 0)),
        "scored_on": scored_on,
    }
    with torch.random.fork_rng(devices=[backbone.device] if backbone.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for probe in wanted:
            if probe in report.skipped:
                continue
            if probe == "cls":
                num_classes = getattr(datamodule, "num_classes", None)
                if num_classes is None:
                    raise RegablateError("the classification probe needs the data module's num_classes")
                metrics, details = classify(backbone, raw, settings, num_classes=num_classes, **common)
            elif probe == "seg":
                metrics, details = segment(
                    backbone,
                    raw,
                    settings,
                    num_stored_classes=getattr(datamodule, "num_seg_classes", None),
                    ignore_index=ignore_index,
                    **common,
                )
            else:
                metrics, details = estimate_depth(backbone, raw, settings, **common)
            report.metrics.update(metrics)
            report.protocol[probe] = details
    report.metrics["probe/protocol"] = "dinov2"
    report.protocol["settings"] = {
        "protocol": "dinov2",
        **plain(asdict(settings)),
        "image_scale_used": scale,
        "probes": list(probes),
        "seed": seed,
        "ignore_index": ignore_index,
    }
    report.protocol["scored_on"] = scored_on
    return report
