"""``LinearProbe``: the frozen-feature protocol of Figure 8 and Table 3, run on cached features.

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
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from regablate.errors import RegablateError
from regablate.minibatch import Schedule, train_head
from regablate.probe.dinov2.settings import DINOv2Settings
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

log = logging.getLogger(__name__)

DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
# Feature groups of the classification grid; registers enter neither.
CLS_FEATURES = ("cls", "cls+mean")
PROBES = ("cls", "seg", "depth", "lost")
# Opt-in, run by the probe command on the backbone itself (regablate.artifacts.token_probes), not on cached features.
TOKEN_PROBE = "token"
# The targets each probe needs in the data.
NEEDS = {"cls": "label", "seg": "mask", "depth": "depth", "lost": "box"}
# The fields each probe reads, by the role of the split: "train" fits its head, "select" picks the
# classifier's learning rate (val), "score" gives the reported numbers (test, else val).
READS = {
    "cls": dict.fromkeys(("train", "select", "score"), ("cls", "mean_patch", "label")),
    "seg": dict.fromkeys(("train", "score"), ("patches", "mask")),
    "depth": dict.fromkeys(("train", "score"), ("patches", "cls", "depth")),
    "lost": {"score": ("keys", "box")},
}
CLASSIFY_CHUNK = 4096  # samples per evaluation step of the classifier grid
DENSE_BYTES = 256 * 2**20  # budget of the upsampled logits of one evaluation step of a dense head


def role_splits(scored_on: str) -> dict[str, str]:
    """Which split plays each role: train, select (val) and score (``scored_on``: test, or val without one)."""
    return {"train": "train", "select": "val", "score": scored_on}


@dataclass
class ProbeReport:
    """``metrics``: flat summary values (``probe/...``); ``protocol``: the details behind them."""

    metrics: dict[str, float | int | str] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class LinearProbe:
    """Frozen-feature probes: ``fast`` (heads on cached features, this class) or ``dinov2`` (DINOv2's protocols).

    ``protocol: dinov2`` runs ``regablate.probe.dinov2`` with the ``dinov2`` settings for the
    classification, segmentation and depth probes (the backbone in the loop, nothing cached); LOST
    trains nothing and has one protocol, this one, under both. ``probes``, ``ignore_index``, ``seed``
    and ``lost_k`` apply to both protocols, the other settings here to ``fast`` only.

    Args:
        protocol: fast (cached features, the CPU grid's default) or dinov2 (DINOv2's protocols, the paper's).
        dinov2: settings of the dinov2 protocol (defaults: DINOv2's).
        lrs: learning-rate grid of the classification heads (SGD, momentum 0.9, cosine).
        cls_steps: steps of the classification heads.
        seg_steps: steps of the segmentation head (AdamW, cosine).
        seg_lr: AdamW learning rate of the segmentation head.
        depth_steps: steps of the depth head (AdamW, cosine).
        depth_lr: AdamW learning rate of the depth head.
        depth_bins: number of linear depth bins, spanning the train split's depth range.
        batch_size: images per mini-batch of every head.
        pixels_per_image: random pixels per image on which the segmentation and depth losses
            are computed each step (an unbiased estimate of the loss on the upsampled map).
        ignore_index: mask value that marks unlabelled pixels (VOC/ADE20k use 255).
        lost_k: LOST's number of lowest-degree patches to expand the seed among.
        probes: which probes to run (cls, seg, depth, lost; and token, not by default: --token_probe.*).
        seed: seed of head initialisation, mini-batch order and the sampled pixels.
    """

    protocol: Literal["fast", "dinov2"] = "fast"
    dinov2: DINOv2Settings = field(default_factory=DINOv2Settings)
    lrs: Sequence[float] = DEFAULT_LRS
    cls_steps: int = 300
    seg_steps: int = 400
    seg_lr: float = 2e-2
    depth_steps: int = 200
    depth_lr: float = 1e-2
    depth_bins: int = 256
    batch_size: int = 64
    pixels_per_image: int = 64
    ignore_index: int | None = 255
    lost_k: int = 100
    probes: Sequence[str] = PROBES
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.probes) - {*PROBES, TOKEN_PROBE}
        if unknown:
            raise RegablateError(f"unknown probe(s) {sorted(unknown)}; choose from {', '.join(PROBES)}, {TOKEN_PROBE}")
        if len(self.lrs) < 1 or any(lr <= 0 for lr in self.lrs):
            raise RegablateError(f"lrs must be positive learning rates, got {list(self.lrs)}")
        for name in ("cls_steps", "seg_steps", "depth_steps", "batch_size", "pixels_per_image", "depth_bins", "lost_k"):
            if getattr(self, name) < 1:
                raise RegablateError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def cached_probes(self) -> list[str]:
        """The probes that run here, on cached features: all under ``fast``, LOST only under ``dinov2``."""
        return [probe for probe in self.probes if probe != TOKEN_PROBE and (self.protocol == "fast" or probe == "lost")]

    def schedule(self, steps: int) -> Schedule:
        return Schedule(steps=steps, batch_size=self.batch_size, seed=self.seed)

    def fields(self, split: str, scored_on: str, skipped: Collection[str] = ()) -> set[str]:
        """The fields ``split`` must hold for the cached probes that run (all but ``skipped``)."""
        return {
            name
            for probe in self.cached_probes
            if probe not in skipped
            for role, names in READS[probe].items()
            if role_splits(scored_on)[role] == split
            for name in names
        }

    def missing_targets(self, targets: dict[str, set[str]], scored_on: str) -> dict[str, str]:
        """Probes that cannot run -> why, given the targets each split carries (``targets``)."""
        skipped = {}
        for probe in self.cached_probes:
            needed = sorted({role_splits(scored_on)[role] for role in READS[probe]}, key=["train", "val", "test"].index)
            lacking = [split for split in needed if NEEDS[probe] not in targets.get(split, set())]
            if lacking:
                skipped[probe] = f"the data have no '{NEEDS[probe]}' in {', '.join(lacking)}"
        return skipped

    def run(
        self,
        splits: dict[str, FeatureSet],
        *,
        patch_size: tuple[int, int],
        num_classes: int | None = None,
        num_seg_classes: int | None = None,
        scored_on: str | None = None,
        device: torch.device | str = "cpu",
    ) -> ProbeReport:
        """Train and score every probe the data allow on ``device``.

        ``splits`` maps train, val and test to their features (only the splits the probes read);
        ``scored_on`` is test, or val for data without a test split (default: test when given).
        """
        device = torch.device(device)
        scored_on = scored_on or ("test" if "test" in splits else "val")
        targets = {name: {k for k in NEEDS.values() if getattr(split, k) is not None} for name, split in splits.items()}
        report = ProbeReport(skipped=self.missing_targets(targets, scored_on))
        for probe, reason in report.skipped.items():
            log.warning("skipping the %s probe: %s", probe, reason)
        train, val, score = splits.get("train"), splits.get("val"), splits.get(scored_on)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            for probe in self.cached_probes:
                if probe in report.skipped:
                    continue
                if probe == "cls":
                    self._classify(train, val, splits.get("test"), num_classes, report, device)
                elif probe == "seg":
                    self._segment(train, score, num_seg_classes, scored_on, report, device)
                elif probe == "depth":
                    self._depth(train, score, scored_on, report, device)
                else:
                    self._lost(score, patch_size, scored_on, report, device)
        report.protocol["scored_on"] = scored_on
        if scored_on == "val":
            report.protocol["scored_on_why"] = (
                "the data have no test split: heads trained on train, every score (and the classifier's lr) on val"
            )
        report.metrics["probe/protocol"] = self.protocol
        settings = {k: v for k, v in asdict(self).items() if k != "dinov2"}  # the dinov2 runner records its own
        report.protocol["settings"] = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in settings.items()}
        return report

    def _classify(
        self,
        train: FeatureSet,
        val: FeatureSet,
        test: FeatureSet | None,
        num_classes: int | None,
        report: ProbeReport,
        device: torch.device,
    ) -> None:
        labelled = [s for s in (train, val, test) if s is not None]
        classes = num_classes or max(int(_chunked_max(s.label)) for s in labelled) + 1
        width = train.cls.shape[-1] + train.mean_patch.shape[-1]
        grid = LinearClassifierGrid(len(CLS_FEATURES), width, classes, self.lrs).to(device)
        optimizer = torch.optim.SGD(grid.parameters(), lr=1.0, momentum=0.9, fused=True)
        train_head(
            optimizer,
            lambda idx: grid.loss(_classifier_inputs(train, idx, device), train.label[idx].to(device).long()),
            len(train),
            self.schedule(self.cls_steps),
            "probe: cls head",
        )
        val_top1 = _grid_accuracy(grid, val, device)
        best = int(val_top1.flatten().argmax())
        group, lr_index = divmod(best, len(self.lrs))
        if test is not None:
            report.metrics["probe/cls_top1"] = float(_grid_accuracy(grid, test, device)[group, lr_index])
        report.metrics.update(
            {
                "probe/cls_val_top1": float(val_top1[group, lr_index]),
                "probe/cls_lr": float(self.lrs[lr_index]),
                "probe/cls_features": CLS_FEATURES[group],
                "probe/cls_steps": self.cls_steps,
            }
        )
        report.protocol["cls"] = {
            "features": list(CLS_FEATURES),
            "lrs": list(self.lrs),
            "steps": self.cls_steps,
            "optimizer": "SGD momentum 0.9, cosine, no weight decay",
            "selected": {"features": CLS_FEATURES[group], "lr": float(self.lrs[lr_index])},
            "val_top1": {f: dict(zip(map(str, self.lrs), val_top1[g].tolist())) for g, f in enumerate(CLS_FEATURES)},
        }

    def _segment(
        self,
        train: FeatureSet,
        score: FeatureSet,
        num_seg_classes: int | None,
        scored_on: str,
        report: ProbeReport,
        device: torch.device,
    ) -> None:
        classes = num_seg_classes or _count_mask_classes(train.mask, self.ignore_index)
        head = SegmentationHead(train.patches.shape[-1], classes).to(device)
        ignore = -100 if self.ignore_index is None else self.ignore_index
        pixels = PixelSampler(tuple(train.mask.shape[-2:]))

        def loss_of(idx: Tensor) -> Tensor:
            logits = head.logits(train.patches[idx].to(device, non_blocking=True))
            ys, xs = pixels.draw(len(idx), self.pixels_per_image)
            labels = train.mask[idx[:, None], ys, xs].to(device).long()
            if not (labels != ignore).any():  # no labelled pixel drawn: nothing to learn from
                return logits.sum() * 0.0
            sampled = pixels(logits, ys.to(device), xs.to(device))
            return F.cross_entropy(sampled.flatten(0, 1), labels.flatten(), ignore_index=ignore)

        optimizer = torch.optim.AdamW(head.parameters(), lr=self.seg_lr, weight_decay=1e-4, fused=True)
        head.train()
        train_head(optimizer, loss_of, len(train), self.schedule(self.seg_steps), "probe: seg head")
        head.eval()
        size = tuple(score.mask.shape[-2:])
        miou = miou_metric(classes, self.ignore_index).to(device)
        with torch.no_grad():
            for idx in chunks(len(score), _dense_chunk(classes, size)):
                logits = head(score.patches[idx].to(device, non_blocking=True), size)
                miou.update(logits.argmax(dim=1), score.mask[idx].to(device).long())
        report.metrics.update(
            {
                scored_key("seg", "miou", scored_on): float(miou.compute()),
                "probe/seg_lr": self.seg_lr,
                "probe/seg_steps": self.seg_steps,
            }
        )
        report.protocol["seg"] = {
            "features": "patch tokens",
            "head": "BatchNorm + linear per patch (a 1x1 conv), logits bilinearly upsampled to the mask",
            "loss": f"cross-entropy of the upsampled logits at {self.pixels_per_image} random pixels per image a step",
            "classes": classes,
            "ignore_index": self.ignore_index,
            "lr": self.seg_lr,
            "steps": self.seg_steps,
            "optimizer": "AdamW weight decay 1e-4, cosine",
        }

    def _depth(
        self, train: FeatureSet, score: FeatureSet, scored_on: str, report: ProbeReport, device: torch.device
    ) -> None:
        for split, depth in (("train", train.depth), (scored_on, score.depth)):
            invalid = sum(int((~valid_depth(part)).sum()) for part in depth.split(256))
            log.info(
                "depth: %d of %d %s pixels invalid (missing or out of range): never scored",
                invalid,
                depth.numel(),
                split,
            )
        depth_range = _valid_depth_range(train.depth)
        if depth_range is None:
            report.skipped["depth"] = "the train split has no valid (finite, positive) depth"
            log.warning("skipping the depth probe: %s", report.skipped["depth"])
            return
        low, high = depth_range
        centres = linear_bin_centres(low, high, self.depth_bins)
        head = DepthHead(train.patches.shape[-1], train.cls.shape[-1], centres).to(device)
        pixels = PixelSampler(tuple(train.depth.shape[-2:]))

        def loss_of(idx: Tensor) -> Tensor:
            depth = head.depth(train.patches[idx].to(device, non_blocking=True), train.cls[idx].to(device))
            ys, xs = pixels.draw(len(idx), self.pixels_per_image)
            target = train.depth[idx[:, None], ys, xs].to(device)
            valid = valid_depth(target)
            if not valid.any():  # no pixel with a depth drawn
                return depth.sum() * 0.0
            return F.mse_loss(pixels(depth, ys.to(device), xs.to(device))[valid], target[valid])

        optimizer = torch.optim.AdamW(head.parameters(), lr=self.depth_lr, weight_decay=1e-4, fused=True)
        train_head(optimizer, loss_of, len(train), self.schedule(self.depth_steps), "probe: depth head")
        rmse = rmse_metric().to(device)
        size = tuple(score.depth.shape[-2:])
        with torch.no_grad():
            for idx in chunks(len(score), _dense_chunk(1, size)):
                target = score.depth[idx].to(device)
                valid = valid_depth(target)
                predicted = head(score.patches[idx].to(device), score.cls[idx].to(device), size)
                rmse.update(predicted[valid], target[valid])
        report.metrics.update(
            {
                scored_key("depth", "rmse", scored_on): float(rmse.compute()),
                "probe/depth_lr": self.depth_lr,
                "probe/depth_steps": self.depth_steps,
                "probe/depth_bins": self.depth_bins,
            }
        )
        report.protocol["depth"] = {
            "features": "[patch, CLS]",
            "head": f"linear over {self.depth_bins} linear bins, softmax-weighted bin centres, bilinear upsampling",
            "depth_range": [low, high],
            "lr": self.depth_lr,
            "steps": self.depth_steps,
            "loss": f"MSE of the upsampled depth at {self.pixels_per_image} random valid pixels per image a step",
            "optimizer": "AdamW weight decay 1e-4, cosine",
        }

    def _lost(
        self, score: FeatureSet, patch_size: tuple[int, int], scored_on: str, report: ProbeReport, device: torch.device
    ) -> None:
        if score.keys is None:
            report.skipped["lost"] = "the features hold no attention keys"
            log.warning("skipping the lost probe: %s", report.skipped["lost"])
            return
        boxes = torch.cat(
            [lost_boxes(score.keys[idx].to(device), patch_size, self.lost_k).cpu() for idx in chunks(len(score), 256)]
        )
        report.metrics.update(
            {scored_key("lost", "corloc", scored_on): corloc(boxes, score.box.float()), "probe/lost_k": self.lost_k}
        )
        report.protocol["lost"] = {
            "features": "last-block keys of the patch tokens (heads concatenated)",
            "k": self.lost_k,
            "score": "CorLoc, IoU >= 0.5 with the ground-truth box",
        }


def scored_key(probe: str, metric: str, scored_on: str) -> str:
    """``probe/<probe>_<metric>`` for test scores, ``probe/<probe>_val_<metric>`` for val scores."""
    return f"probe/{probe}_{metric}" if scored_on == "test" else f"probe/{probe}_val_{metric}"


def _classifier_inputs(split: FeatureSet, idx: Tensor, device: torch.device) -> Tensor:
    """(2, B, 2D) on ``device``: CLS zero-padded to the width of [CLS, mean patch], then [CLS, mean patch]."""
    cls = split.cls[idx].to(device, non_blocking=True).float()
    both = torch.cat([cls, split.mean_patch[idx].to(device, non_blocking=True).float()], dim=-1)
    return torch.stack([F.pad(cls, (0, both.shape[-1] - cls.shape[-1])), both])


@torch.no_grad()
def _grid_accuracy(grid: LinearClassifierGrid, split: FeatureSet, device: torch.device) -> Tensor:
    """Top-1 (the share of samples whose highest logit is their label) of every head (G, L), chunk by chunk;
    a head whose logits are not finite (diverged) scores -1."""
    correct = torch.zeros(grid.weight.shape[:2], dtype=torch.long, device=device)
    finite = torch.ones(grid.weight.shape[:2], dtype=torch.bool, device=device)
    for idx in chunks(len(split), CLASSIFY_CHUNK):
        logits = grid(_classifier_inputs(split, idx, device))  # (G, L, B, C)
        correct += (logits.argmax(dim=-1) == split.label[idx].to(device)).sum(dim=-1)
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
