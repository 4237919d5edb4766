"""``LinearProbe``: the frozen-feature protocol of Figure 8 and Table 3, run on cached features.

Given the :class:`FeatureSet` of train, val and test, it trains every head on train and
reports on test: classification (a grid of linear heads on CLS and on CLS + mean patch,
best on val), segmentation (mIoU), depth (RMSE) and LOST object discovery (CorLoc, no
training). A probe whose targets the data lack is skipped with a reason, the others run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy

from regablate.errors import RegablateError
from regablate.probe.dinov2.settings import DINOv2Settings
from regablate.probe.features import FeatureSet
from regablate.probe.heads import (
    DepthHead,
    LinearClassifierGrid,
    PixelSampler,
    Schedule,
    SegmentationHead,
    chunks,
    linear_bin_centres,
    miou_metric,
    rmse_metric,
    train_head,
    valid_depth,
)
from regablate.probe.lost import corloc, lost_boxes

log = logging.getLogger(__name__)

DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
# Feature groups of the classification grid; registers enter neither.
CLS_FEATURES = ("cls", "cls+mean")
PROBES = ("cls", "seg", "depth", "lost")
# The targets each probe needs in the data.
NEEDS = {"cls": "label", "seg": "mask", "depth": "depth", "lost": "box"}
CLASSIFY_CHUNK = 4096  # samples per evaluation step of the classifier grid
DENSE_CHUNK = 256  # images per evaluation step of the segmentation and depth heads


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
    classification, segmentation and depth probes; ``probes``, ``ignore_index``, ``seed`` and the
    LOST settings apply to both protocols, the other settings here to ``fast`` only.

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
        probes: which probes to run (cls, seg, depth, lost).
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
        unknown = set(self.probes) - set(PROBES)
        if unknown:
            raise RegablateError(f"unknown probe(s) {sorted(unknown)}; choose from {', '.join(PROBES)}")
        if len(self.lrs) < 1 or any(lr <= 0 for lr in self.lrs):
            raise RegablateError(f"lrs must be positive learning rates, got {list(self.lrs)}")
        for name in ("cls_steps", "seg_steps", "depth_steps", "batch_size", "pixels_per_image", "depth_bins", "lost_k"):
            if getattr(self, name) < 1:
                raise RegablateError(f"{name} must be at least 1, got {getattr(self, name)}")

    def schedule(self, steps: int) -> Schedule:
        return Schedule(steps=steps, batch_size=self.batch_size, seed=self.seed)

    def missing_targets(self, splits: dict[str, FeatureSet]) -> dict[str, str]:
        """Probes that cannot run on these splits -> why (the LOST probe needs test boxes only)."""
        skipped = {}
        for probe in self.probes:
            needed = ("test",) if probe == "lost" else ("train", "val", "test")
            lacking = [s for s in needed if getattr(splits[s], NEEDS[probe]) is None]
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
    ) -> ProbeReport:
        """Train and score every probe the data allow; ``splits`` maps train/val/test to features."""
        report = ProbeReport(skipped=self.missing_targets(splits))
        for probe, reason in report.skipped.items():
            log.warning("skipping the %s probe: %s", probe, reason)
        train, val, test = splits["train"], splits["val"], splits["test"]
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            for probe in self.probes:
                if probe in report.skipped:
                    continue
                if probe == "cls":
                    self._classify(train, val, test, num_classes, report)
                elif probe == "seg":
                    self._segment(train, test, num_seg_classes, report)
                elif probe == "depth":
                    self._depth(train, test, report)
                else:
                    self.lost(test, patch_size, report)
        report.metrics["probe/protocol"] = "fast"
        settings = {k: v for k, v in asdict(self).items() if k != "dinov2"}
        report.protocol["settings"] = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in settings.items()}
        return report

    def _classify(
        self, train: FeatureSet, val: FeatureSet, test: FeatureSet, num_classes: int | None, report: ProbeReport
    ) -> None:
        classes = num_classes or int(max(s.label.max() for s in (train, val, test))) + 1
        inputs = {name: _classifier_inputs(split) for name, split in (("train", train), ("val", val), ("test", test))}
        grid = LinearClassifierGrid(len(CLS_FEATURES), inputs["train"].shape[-1], classes, self.lrs)
        optimizer = torch.optim.SGD(grid.parameters(), lr=1.0, momentum=0.9, fused=True)
        labels = train.label.long()
        train_head(
            optimizer,
            lambda idx: grid.loss(inputs["train"][:, idx], labels[idx]),
            len(labels),
            self.schedule(self.cls_steps),
        )
        val_top1 = _grid_accuracy(grid, inputs["val"], val.label.long(), classes)
        best = int(val_top1.flatten().argmax())
        group, lr_index = divmod(best, len(self.lrs))
        test_top1 = _grid_accuracy(grid, inputs["test"], test.label.long(), classes)[group, lr_index]
        report.metrics.update(
            {
                "probe/cls_top1": float(test_top1),
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

    def _segment(self, train: FeatureSet, test: FeatureSet, num_seg_classes: int | None, report: ProbeReport) -> None:
        classes = num_seg_classes or _count_mask_classes(train.mask, self.ignore_index)
        head = SegmentationHead(train.patches.shape[-1], classes)
        ignore = -100 if self.ignore_index is None else self.ignore_index
        pixels = PixelSampler(tuple(train.mask.shape[-2:]))

        def loss_of(idx: Tensor) -> Tensor:
            logits = head.logits(train.patches[idx])
            ys, xs = pixels.draw(len(idx), self.pixels_per_image)
            labels = train.mask[idx[:, None], ys, xs].long()
            if not (labels != ignore).any():  # no labelled pixel drawn: nothing to learn from
                return logits.sum() * 0.0
            return F.cross_entropy(pixels(logits, ys, xs).flatten(0, 1), labels.flatten(), ignore_index=ignore)

        optimizer = torch.optim.AdamW(head.parameters(), lr=self.seg_lr, weight_decay=1e-4, fused=True)
        head.train()
        train_head(optimizer, loss_of, len(train.mask), self.schedule(self.seg_steps))
        head.eval()
        miou = miou_metric(classes, self.ignore_index)
        with torch.no_grad():
            for idx in chunks(len(test.mask), DENSE_CHUNK):
                miou.update(head(test.patches[idx], tuple(test.mask.shape[-2:])).argmax(dim=1), test.mask[idx].long())
        report.metrics.update(
            {"probe/seg_miou": float(miou.compute()), "probe/seg_lr": self.seg_lr, "probe/seg_steps": self.seg_steps}
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

    def _depth(self, train: FeatureSet, test: FeatureSet, report: ProbeReport) -> None:
        known = train.depth[valid_depth(train.depth)]
        if known.numel() == 0:
            report.skipped["depth"] = "the train split has no valid (finite, positive) depth"
            log.warning("skipping the depth probe: %s", report.skipped["depth"])
            return
        low, high = float(known.min()), float(known.max())
        head = DepthHead(train.patches.shape[-1], train.cls.shape[-1], linear_bin_centres(low, high, self.depth_bins))
        pixels = PixelSampler(tuple(train.depth.shape[-2:]))

        def loss_of(idx: Tensor) -> Tensor:
            depth = head.depth(train.patches[idx], train.cls[idx])
            ys, xs = pixels.draw(len(idx), self.pixels_per_image)
            target = train.depth[idx[:, None], ys, xs]
            valid = valid_depth(target)
            if not valid.any():  # no pixel with a depth drawn
                return depth.sum() * 0.0
            return F.mse_loss(pixels(depth, ys, xs)[valid], target[valid])

        optimizer = torch.optim.AdamW(head.parameters(), lr=self.depth_lr, weight_decay=1e-4, fused=True)
        train_head(optimizer, loss_of, len(train.depth), self.schedule(self.depth_steps))
        rmse = rmse_metric()
        with torch.no_grad():
            for idx in chunks(len(test.depth), DENSE_CHUNK):
                target = test.depth[idx]
                valid = valid_depth(target)
                rmse.update(head(test.patches[idx], test.cls[idx], tuple(target.shape[-2:]))[valid], target[valid])
        report.metrics.update(
            {
                "probe/depth_rmse": float(rmse.compute()),
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

    def lost(self, test: FeatureSet, patch_size: tuple[int, int], report: ProbeReport) -> None:
        """LOST on the test features into ``report`` (no training: the same under either protocol)."""
        if test.keys is None:
            report.skipped["lost"] = "the features hold no attention keys"
            log.warning("skipping the lost probe: %s", report.skipped["lost"])
            return
        boxes = torch.cat([lost_boxes(test.keys[idx], patch_size, self.lost_k) for idx in chunks(len(test.box), 256)])
        report.metrics.update({"probe/lost_corloc": corloc(boxes, test.box.float()), "probe/lost_k": self.lost_k})
        report.protocol["lost"] = {
            "features": "last-block keys of the patch tokens (heads concatenated)",
            "k": self.lost_k,
            "score": "CorLoc, IoU >= 0.5 with the ground-truth box",
        }


def _classifier_inputs(split: FeatureSet) -> Tensor:
    """(2, N, 2D): CLS zero-padded to the width of [CLS, mean patch], then [CLS, mean patch]."""
    both = torch.cat([split.cls, split.mean_patch], dim=-1)
    return torch.stack([F.pad(split.cls, (0, both.shape[-1] - split.cls.shape[-1])), both])


@torch.no_grad()
def _grid_accuracy(grid: LinearClassifierGrid, inputs: Tensor, labels: Tensor, classes: int) -> Tensor:
    """Top-1 of every head (G, L); a head whose logits are not finite (diverged) scores -1."""
    logits = torch.cat([grid(inputs[:, idx]) for idx in chunks(len(labels), CLASSIFY_CHUNK)], dim=2)
    scores = torch.empty(logits.shape[:2])
    for g in range(logits.shape[0]):
        for lr in range(logits.shape[1]):
            head = logits[g, lr]
            finite = bool(torch.isfinite(head).all())
            scores[g, lr] = multiclass_accuracy(head, labels, classes, average="micro") if finite else -1.0
    return scores


def _count_mask_classes(mask: Tensor, ignore_index: int | None) -> int:
    values = mask.unique().long()
    values = values[values != ignore_index] if ignore_index is not None else values
    if values.numel() == 0:
        raise RegablateError("the train masks hold no labelled pixel")
    return int(values.max()) + 1
