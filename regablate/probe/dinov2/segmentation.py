"""DINOv2's linear segmentation protocol (ADE20k "lin."): the mmseg config of its ``linear`` heads.

Head (``dinov2/eval/segmentation/models/decode_heads/linear_head.py`` ``BNHead``): BatchNorm over
the last block's patch tokens (after the final norm), then a 1x1 convolution to the classes
(``conv_seg``, weights N(0, 0.01), bias 0); logits are upsampled bilinearly to the label map.
Training: ``seg_iterations`` iterations of ``seg_batch_size`` random crops (``views.SegmentationTrainView``),
cross-entropy with ignored pixels counted in the mean (mmseg's ``avg_non_ignore=False``),
AdamW (lr 1e-3, weight decay 1e-4), linear warm-up then poly (power 1) decay. Scoring: each test
image resized to the test scale, logits of sliding windows (crop 512, stride 341; mmseg's
``slide_inference``) averaged where they overlap, upsampled to the stored mask, argmax; mIoU from
the confusion matrix over the whole split, classes absent from both prediction and truth left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import Dataset

from regablate.data.common import num_samples
from regablate.errors import RegablateError
from regablate.probe.dinov2.backbone import FrozenBackbone
from regablate.probe.dinov2.data import IGNORE, Views, evaluation_batches, same_size_groups, training_batches
from regablate.probe.dinov2.schedules import warmup_poly
from regablate.probe.dinov2.settings import DINOv2Settings, scaled
from regablate.probe.dinov2.views import SegmentationEvalView, SegmentationLabels, SegmentationTrainView
from regablate.probe.heads import miou_metric
from regablate.probe.protocol import scored_key
from regablate.progress import Progress

LOGIT_BUDGET = 2**28  # float32 logits held at once when scoring (1 GiB): ADE20k's 150 classes fit ~5 images


class BNHead(nn.Module):
    """dinov2's ``BNHead``: BatchNorm of the patch tokens, then ``conv_seg``, a 1x1 convolution to the classes."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(width)
        self.conv_seg = nn.Conv2d(width, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)  # mmseg BaseDecodeHead init_cfg: Normal(std=0.01), conv_seg
        nn.init.zeros_(self.conv_seg.bias)  # type: ignore[arg-type]  # bias=True above: never None

    def forward(self, patches: Tensor) -> Tensor:
        """Patch tokens (B, D, h, w) -> class logits on the patch grid (B, C, h, w)."""
        return self.conv_seg(self.bn(patches))


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of mmseg's ``slide_inference`` windows; a side shorter than ``crop`` is one window."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    windows = []
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride + crop, height), min(col * stride + crop, width)
            windows.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return windows


def count_classes(raw: Dataset, ignore_index: int | None) -> int:
    """Stored class values in the train masks (the largest id + 1, ``ignore_index`` above the ids not counted)."""
    largest = -1
    for index in range(num_samples(raw)):
        mask = torch.as_tensor(raw[index]["mask"])
        values = mask[mask != ignore_index] if ignore_index is not None else mask
        if values.numel():
            largest = max(largest, int(values.max()))
    if largest < 0:
        raise RegablateError("the train masks hold no labelled pixel")
    return largest + 1


class SegmentationProbe:
    """The BNHead trained on random crops through the frozen backbone, scored by sliding windows."""

    def __init__(
        self, backbone: FrozenBackbone, settings: DINOv2Settings, labels: SegmentationLabels, scale: float
    ) -> None:
        self.backbone, self.settings, self.labels = backbone, settings, labels
        self.crop = scaled(settings.seg_crop_size, scale)
        self.stride = scaled(settings.seg_stride, scale)
        self.short_side = scaled(settings.seg_short_side, scale)
        self.head = BNHead(backbone.width, labels.num_classes).to(backbone.device)

    def logits(self, images: Tensor) -> Tensor:
        """Normalised images (B, 3, H, W) -> logits on their patch grid (B, C, h, w)."""
        return self.head(self.backbone.last_blocks(images, 1, norm=True)[-1][0])

    def train(
        self, raw: Dataset, normalisation: tuple[Sequence[float], Sequence[float]], seed: int, workers: int
    ) -> None:
        settings = self.settings
        views = Views(
            raw,
            SegmentationTrainView(
                self.labels,
                self.short_side,
                tuple(settings.seg_ratio_range),
                self.crop,
                settings.seg_cat_max_ratio,
                *normalisation,
            ),
        )
        iterations = settings.seg_iterations
        optimizer = torch.optim.AdamW(
            self.head.parameters(), lr=settings.seg_lr, betas=(0.9, 0.999), weight_decay=settings.seg_weight_decay
        )
        schedule = LambdaLR(optimizer, warmup_poly(iterations, round(settings.seg_warmup * iterations)))
        batches = training_batches(views, settings.seg_batch_size, seed, workers, self.backbone.device.type == "cuda")
        progress = Progress("probe: dinov2 seg", iterations, unit="iterations")
        self.head.train()
        for _ in range(iterations):
            batch = next(batches)
            progress.update(1)
            mask = batch["mask"].to(self.backbone.device, non_blocking=True)
            logits = F.interpolate(
                self.logits(batch["image"]), size=mask.shape[-2:], mode="bilinear", align_corners=False
            )
            # mmseg CrossEntropyLoss(avg_non_ignore=False): the mean over all pixels, ignored ones adding 0.
            loss = F.cross_entropy(logits, mask, ignore_index=IGNORE, reduction="sum") / mask.numel()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        progress.finish()

    @torch.no_grad()
    def slide(self, images: Tensor) -> Tensor:
        """Window-averaged logits (B, C, H, W) of same-size images (B, 3, H, W), as mmseg's ``slide_inference``.

        Each window's logits are resized to the window (mmseg's ``encode_decode``), summed where
        windows overlap and divided by the count.
        """
        height, width = images.shape[-2:]
        total: Tensor | None = None
        count = images.new_zeros(1, 1, height, width)
        for y1, y2, x1, x2 in slide_windows(height, width, self.crop, self.stride):
            logits = self.logits(images[:, :, y1:y2, x1:x2])
            logits = F.interpolate(logits, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
            if total is None:
                total = logits.new_zeros(len(images), logits.shape[1], height, width)
            total[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
        if total is None:
            raise RegablateError(f"no sliding window fits a {height}x{width} image")
        return total / count.to(total.dtype)

    @torch.no_grad()
    def miou(self, raw: Dataset, normalisation: tuple[Sequence[float], Sequence[float]], workers: int) -> float:
        self.head.eval()
        metric = miou_metric(self.labels.num_classes, IGNORE)
        view = SegmentationEvalView(self.labels, self.short_side, *normalisation)
        for samples in evaluation_batches(Views(raw, view), self.settings.eval_batch_size, workers):
            for group in same_size_groups([s["image"] for s in samples]):
                height, width = samples[group[0]]["image"].shape[-2:]
                # Images per forward: at most eval_batch_size, and window-averaged logits within LOGIT_BUDGET.
                per_forward = max(1, min(len(group), LOGIT_BUDGET // (self.labels.num_classes * height * width)))
                for start in range(0, len(group), per_forward):
                    chunk = group[start : start + per_forward]
                    logits = self.slide(torch.stack([samples[i]["image"] for i in chunk]))
                    for i, image_logits in zip(chunk, logits):
                        truth = samples[i]["mask"]
                        full = F.interpolate(image_logits[None], size=truth.shape, mode="bilinear", align_corners=False)
                        metric.update(full.argmax(dim=1).cpu(), truth[None])
        return float(metric.compute())


def segment(
    backbone: FrozenBackbone,
    raw: dict[str, Dataset],
    settings: DINOv2Settings,
    *,
    num_stored_classes: int | None,
    ignore_index: int | None,
    scale: float,
    normalisation: tuple[Sequence[float], Sequence[float]],
    seed: int,
    num_workers: int,
    scored_on: str = "test",
) -> tuple[dict, dict]:
    """Train the BNHead on ``raw["train"]`` and score mIoU on ``raw[scored_on]``: (metrics, protocol)."""
    if num_stored_classes is None:
        num_stored_classes = count_classes(raw["train"], ignore_index)
        rank_zero_info(f"dinov2 seg: {num_stored_classes} mask values in the train split")
    labels = SegmentationLabels(num_stored_classes, ignore_index)
    probe = SegmentationProbe(backbone, settings, labels, scale)
    probe.train(raw["train"], normalisation, seed, num_workers)
    miou = probe.miou(raw[scored_on], normalisation, num_workers)
    metrics = {
        scored_key("seg", "miou", scored_on): miou,
        "probe/seg_lr": float(settings.seg_lr),
        "probe/seg_iterations": int(settings.seg_iterations),
    }
    protocol = {
        "features": "last block's patch tokens after the final norm",
        "head": "BatchNorm + 1x1 conv (N(0, 0.01)), logits bilinearly upsampled to the label map",
        "classes": labels.num_classes,
        "ignore_index": ignore_index,
        "reduce_zero_label": labels.reduces,
        "loss": "cross-entropy, mean over all pixels of the crop (ignored ones add 0)",
        "optimizer": (
            f"AdamW lr {settings.seg_lr} weight decay {settings.seg_weight_decay}, "
            f"linear warm-up {round(settings.seg_warmup * settings.seg_iterations)} iterations, poly (power 1) to 0"
        ),
        "train_view": (
            f"resize to shorter side {probe.short_side} x U{tuple(settings.seg_ratio_range)} (longer side <= 4x), "
            f"RandomCrop({probe.crop}, cat_max_ratio {settings.seg_cat_max_ratio}), flip, photometric distortion, "
            f"pad to {probe.crop}"
        ),
        "inference": f"resize to shorter side {probe.short_side}, sliding windows {probe.crop} stride {probe.stride}",
        "score": "mIoU over the classes, confusion matrix of the whole test split at the stored mask resolution",
        "iterations": int(settings.seg_iterations),
        "batch_size": int(settings.seg_batch_size),
    }
    return metrics, protocol
