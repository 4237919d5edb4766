"""The fast protocol (``--probe.protocol fast``) of Figure 8 and Table 3: linear heads on cached features.

Given the :class:`FeatureSet` of train, val and test, it trains every head on train and
reports on test: classification (a grid of linear heads on CLS and on CLS + mean patch,
best on val), segmentation (mIoU), depth (RMSE) and LOST object discovery (CorLoc, no
training). A probe whose targets the data lack is skipped with a reason, the others run.

Data without a test split (ImageNet: ``test_split: null``) are scored on val: the heads train on
train, the classifier's learning rate is picked on val, and every score is the val score, under
keys that say so (``probe/cls_val_top1``, ``probe/seg_val_miou``, ``probe/depth_val_rmse``,
``probe/lost_val_corloc``; no ``probe/cls_top1``); ``probe.json`` records ``scored_on: val``.
Val is never extracted twice. (``--data.init_args.test_split validation`` makes val the test split
explicitly, for the test keys.)

The heads run on the probe's device; the features stay in host memory (memory-mapped from the
feature store) and each mini-batch is gathered there and moved over, so no split has to fit in
the device's memory or be copied whole.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from regablate.errors import RegablateError
from regablate.minibatch import Schedule, train_head
from regablate.probe.features import FeatureSet
from regablate.probe.heads import (
    DepthHead,
    LinearClassifierGrid,
    PixelSampler,
    SegmentationHead,
    chunks,
    linear_bin_centres,
    miou_metric,
    rmse_metric,
    valid_depth,
)
from regablate.probe.lost import corloc, lost_boxes
from regablate.probe.settings import NEEDS, LinearProbe

log = logging.getLogger(__name__)

# Feature groups of the classification grid; registers enter neither.
CLS_FEATURES = ("cls", "cls+mean")
CLASSIFY_CHUNK = 4096  # samples per evaluation step of the classifier grid
DENSE_BYTES = 256 * 2**20  # budget of the upsampled logits of one evaluation step of a dense head


@dataclass
class ProbeReport:
    """``metrics``: flat summary values (``probe/...``); ``protocol``: the details behind them."""

    metrics: dict[str, float | int | str] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def run_heads(
    probe: LinearProbe,
    splits: dict[str, FeatureSet],
    *,
    patch_size: tuple[int, int],
    num_classes: int | None = None,
    num_seg_classes: int | None = None,
    scored_on: str | None = None,
    device: torch.device | str = "cpu",
) -> ProbeReport:
    """Train and score, on ``device``, every probe of ``probe`` that runs on cached features and the data allow.

    ``splits`` maps train, val and test to their features (only the splits the probes read);
    ``scored_on`` is test, or val for data without a test split (default: test when given).
    """
    device = torch.device(device)
    scored_on = scored_on or ("test" if "test" in splits else "val")
    targets = {name: {k for k in NEEDS.values() if getattr(split, k) is not None} for name, split in splits.items()}
    report = ProbeReport(skipped=probe.missing_targets(targets, scored_on))
    for name, reason in report.skipped.items():
        log.warning("skipping the %s probe: %s", name, reason)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(probe.seed)
        for name in probe.cached_probes:
            if name in report.skipped:
                continue
            if name == "cls":
                _classify(probe, splits, num_classes, report, device)
            elif name == "seg":
                _segment(probe, splits, num_seg_classes, scored_on, report, device)
            elif name == "depth":
                _depth(probe, splits, scored_on, report, device)
            else:
                _lost(probe, splits[scored_on], patch_size, scored_on, report, device)
    report.protocol["scored_on"] = scored_on
    if scored_on == "val":
        report.protocol["scored_on_why"] = (
            "the data have no test split: heads trained on train, every score (and the classifier's lr) on val"
        )
    report.metrics["probe/protocol"] = probe.protocol
    report.protocol["settings"] = probe.recorded()
    return report


def _schedule(probe: LinearProbe, steps: int) -> Schedule:
    return Schedule(steps=steps, batch_size=probe.fast_settings.batch_size, seed=probe.seed)


def _classify(
    probe: LinearProbe,
    splits: dict[str, FeatureSet],
    num_classes: int | None,
    report: ProbeReport,
    device: torch.device,
) -> None:
    fast = probe.fast_settings
    train, val, test = splits["train"], splits["val"], splits.get("test")
    labels = train.need("label")
    classes = num_classes or max(int(_chunked_max(s.need("label"))) for s in (train, val, test) if s is not None) + 1
    width = train.need("cls").shape[-1] + train.need("mean_patch").shape[-1]
    grid = LinearClassifierGrid(len(CLS_FEATURES), width, classes, fast.lrs).to(device)
    optimizer = torch.optim.SGD(grid.parameters(), lr=1.0, momentum=0.9, fused=True)
    train_head(
        optimizer,
        lambda idx: grid.loss(_classifier_inputs(train, idx, device), labels[idx].to(device).long()),
        len(train),
        _schedule(probe, fast.cls_steps),
        "probe: cls head",
    )
    val_top1 = _grid_accuracy(grid, val, device)
    best = int(val_top1.flatten().argmax())
    group, lr_index = divmod(best, len(fast.lrs))
    if test is not None:
        report.metrics["probe/cls_top1"] = float(_grid_accuracy(grid, test, device)[group, lr_index])
    report.metrics.update(
        {
            "probe/cls_val_top1": float(val_top1[group, lr_index]),
            "probe/cls_lr": float(fast.lrs[lr_index]),
            "probe/cls_features": CLS_FEATURES[group],
            "probe/cls_steps": fast.cls_steps,
        }
    )
    report.protocol["cls"] = {
        "features": list(CLS_FEATURES),
        "lrs": list(fast.lrs),
        "steps": fast.cls_steps,
        "optimizer": "SGD momentum 0.9, cosine, no weight decay",
        "selected": {"features": CLS_FEATURES[group], "lr": float(fast.lrs[lr_index])},
        "val_top1": {f: dict(zip(map(str, fast.lrs), val_top1[g].tolist())) for g, f in enumerate(CLS_FEATURES)},
    }


def _segment(
    probe: LinearProbe,
    splits: dict[str, FeatureSet],
    num_seg_classes: int | None,
    scored_on: str,
    report: ProbeReport,
    device: torch.device,
) -> None:
    fast = probe.fast_settings
    patches, masks = splits["train"].need("patches"), splits["train"].need("mask")
    score_patches, score_masks = splits[scored_on].need("patches"), splits[scored_on].need("mask")
    classes = num_seg_classes or _count_mask_classes(masks, probe.ignore_index)
    head = SegmentationHead(patches.shape[-1], classes).to(device)
    ignore = -100 if probe.ignore_index is None else probe.ignore_index
    pixels = PixelSampler((masks.shape[-2], masks.shape[-1]))

    def loss_of(idx: Tensor) -> Tensor:
        logits = head.logits(patches[idx].to(device, non_blocking=True))
        ys, xs = pixels.draw(len(idx), fast.pixels_per_image)
        labels = masks[idx[:, None], ys, xs].to(device).long()
        if not (labels != ignore).any():  # no labelled pixel drawn: nothing to learn from
            return logits.sum() * 0.0
        sampled = pixels(logits, ys.to(device), xs.to(device))
        return F.cross_entropy(sampled.flatten(0, 1), labels.flatten(), ignore_index=ignore)

    optimizer = torch.optim.AdamW(head.parameters(), lr=fast.seg_lr, weight_decay=1e-4, fused=True)
    head.train()
    train_head(optimizer, loss_of, len(patches), _schedule(probe, fast.seg_steps), "probe: seg head")
    head.eval()
    size = (score_masks.shape[-2], score_masks.shape[-1])
    miou = miou_metric(classes, probe.ignore_index).to(device)
    with torch.no_grad():
        for idx in chunks(len(score_patches), _dense_chunk(classes, size)):
            logits = head(score_patches[idx].to(device, non_blocking=True), size)
            miou.update(logits.argmax(dim=1), score_masks[idx].to(device).long())
    report.metrics.update(
        {
            scored_key("seg", "miou", scored_on): float(miou.compute()),
            "probe/seg_lr": fast.seg_lr,
            "probe/seg_steps": fast.seg_steps,
        }
    )
    report.protocol["seg"] = {
        "features": "patch tokens",
        "head": "BatchNorm + linear per patch (a 1x1 conv), logits bilinearly upsampled to the mask",
        "loss": f"cross-entropy of the upsampled logits at {fast.pixels_per_image} random pixels per image a step",
        "classes": classes,
        "ignore_index": probe.ignore_index,
        "lr": fast.seg_lr,
        "steps": fast.seg_steps,
        "optimizer": "AdamW weight decay 1e-4, cosine",
    }


def _depth(
    probe: LinearProbe, splits: dict[str, FeatureSet], scored_on: str, report: ProbeReport, device: torch.device
) -> None:
    fast = probe.fast_settings
    train, score = splits["train"], splits[scored_on]
    patches, cls, depths = train.need("patches"), train.need("cls"), train.need("depth")
    for split, depth in (("train", depths), (scored_on, score.need("depth"))):
        invalid = sum(int((~valid_depth(part)).sum()) for part in depth.split(256))
        log.info(
            "depth: %d of %d %s pixels invalid (missing or out of range): never scored",
            invalid,
            depth.numel(),
            split,
        )
    depth_range = _valid_depth_range(depths)
    if depth_range is None:
        report.skipped["depth"] = "the train split has no valid (finite, positive) depth"
        log.warning("skipping the depth probe: %s", report.skipped["depth"])
        return
    low, high = depth_range
    centres = linear_bin_centres(low, high, fast.depth_bins)
    head = DepthHead(patches.shape[-1], cls.shape[-1], centres).to(device)
    pixels = PixelSampler((depths.shape[-2], depths.shape[-1]))

    def loss_of(idx: Tensor) -> Tensor:
        depth = head.depth(patches[idx].to(device, non_blocking=True), cls[idx].to(device))
        ys, xs = pixels.draw(len(idx), fast.pixels_per_image)
        target = depths[idx[:, None], ys, xs].to(device)
        valid = valid_depth(target)
        if not valid.any():  # no pixel with a depth drawn
            return depth.sum() * 0.0
        return F.mse_loss(pixels(depth, ys.to(device), xs.to(device))[valid], target[valid])

    optimizer = torch.optim.AdamW(head.parameters(), lr=fast.depth_lr, weight_decay=1e-4, fused=True)
    train_head(optimizer, loss_of, len(patches), _schedule(probe, fast.depth_steps), "probe: depth head")
    rmse = rmse_metric().to(device)
    score_depth, score_patches, score_cls = score.need("depth"), score.need("patches"), score.need("cls")
    size = (score_depth.shape[-2], score_depth.shape[-1])
    with torch.no_grad():
        for idx in chunks(len(score_depth), _dense_chunk(1, size)):
            target = score_depth[idx].to(device)
            valid = valid_depth(target)
            predicted = head(score_patches[idx].to(device), score_cls[idx].to(device), size)
            rmse.update(predicted[valid], target[valid])
    report.metrics.update(
        {
            scored_key("depth", "rmse", scored_on): float(rmse.compute()),
            "probe/depth_lr": fast.depth_lr,
            "probe/depth_steps": fast.depth_steps,
            "probe/depth_bins": fast.depth_bins,
        }
    )
    report.protocol["depth"] = {
        "features": "[patch, CLS]",
        "head": f"linear over {fast.depth_bins} linear bins, softmax-weighted bin centres, bilinear upsampling",
        "depth_range": [low, high],
        "lr": fast.depth_lr,
        "steps": fast.depth_steps,
        "loss": f"MSE of the upsampled depth at {fast.pixels_per_image} random valid pixels per image a step",
        "optimizer": "AdamW weight decay 1e-4, cosine",
    }


def _lost(
    probe: LinearProbe,
    score: FeatureSet,
    patch_size: tuple[int, int],
    scored_on: str,
    report: ProbeReport,
    device: torch.device,
) -> None:
    keys = score.keys
    if keys is None:
        report.skipped["lost"] = "the features hold no attention keys"
        log.warning("skipping the lost probe: %s", report.skipped["lost"])
        return
    boxes = torch.cat(
        [lost_boxes(keys[idx].to(device), patch_size, probe.lost_k).cpu() for idx in chunks(len(score), 256)]
    )
    report.metrics.update(
        {
            scored_key("lost", "corloc", scored_on): corloc(boxes, score.need("box").float()),
            "probe/lost_k": probe.lost_k,
        }
    )
    report.protocol["lost"] = {
        "features": "last-block keys of the patch tokens (heads concatenated)",
        "k": probe.lost_k,
        "score": "CorLoc, IoU >= 0.5 with the ground-truth box",
    }


def scored_key(probe: str, metric: str, scored_on: str) -> str:
    """``probe/<probe>_<metric>`` for test scores, ``probe/<probe>_val_<metric>`` for val scores."""
    return f"probe/{probe}_{metric}" if scored_on == "test" else f"probe/{probe}_val_{metric}"


def _classifier_inputs(split: FeatureSet, idx: Tensor, device: torch.device) -> Tensor:
    """(2, B, 2D) on ``device``: CLS zero-padded to the width of [CLS, mean patch], then [CLS, mean patch]."""
    cls = split.need("cls")[idx].to(device, non_blocking=True).float()
    both = torch.cat([cls, split.need("mean_patch")[idx].to(device, non_blocking=True).float()], dim=-1)
    return torch.stack([F.pad(cls, (0, both.shape[-1] - cls.shape[-1])), both])


@torch.no_grad()
def _grid_accuracy(grid: LinearClassifierGrid, split: FeatureSet, device: torch.device) -> Tensor:
    """Top-1 (the share of samples whose highest logit is their label) of every head (G, L), chunk by chunk;
    a head whose logits are not finite (diverged) scores -1."""
    correct = torch.zeros(grid.weight.shape[:2], dtype=torch.long, device=device)
    finite = torch.ones(grid.weight.shape[:2], dtype=torch.bool, device=device)
    labels = split.need("label")
    for idx in chunks(len(split), CLASSIFY_CHUNK):
        logits = grid(_classifier_inputs(split, idx, device))  # (G, L, B, C)
        correct += (logits.argmax(dim=-1) == labels[idx].to(device)).sum(dim=-1)
        finite &= torch.isfinite(logits).flatten(2).all(dim=-1)
    return torch.where(finite, correct / len(split), -1.0).cpu()


def _dense_chunk(channels: int, size: tuple[int, int]) -> int:
    """Images per evaluation step of a dense head whose upsampled float32 output fits ``DENSE_BYTES``."""
    return max(1, DENSE_BYTES // (channels * size[0] * size[1] * 4))


def _chunked_max(values: Tensor, chunk: int = 1 << 16) -> Tensor:
    return torch.stack([part.max() for part in values.split(chunk)]).max()


def _count_mask_classes(mask: Tensor, ignore_index: int | None) -> int:
    """1 + the largest class id in the train masks (chunk by chunk: masks may be memory-mapped)."""
    largest = -1
    for part in mask.split(256):
        values = part.long()
        if ignore_index is not None:
            values = values[values != ignore_index]
        if values.numel():
            largest = max(largest, int(values.max()))
    if largest < 0:
        raise RegablateError("the train masks hold no labelled pixel")
    return largest + 1


def _valid_depth_range(depth: Tensor) -> tuple[float, float] | None:
    """(min, max) of the valid depths (chunk by chunk), or None when there is none."""
    low, high = float("inf"), float("-inf")
    for part in depth.split(256):
        known = part[valid_depth(part)]
        if known.numel():
            low, high = min(low, float(known.min())), max(high, float(known.max()))
    return (low, high) if low <= high else None
