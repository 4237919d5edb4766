"""The settings of DINOv2's frozen-feature protocols, with DINOv2's own values as defaults.

Every default below is what facebookresearch/dinov2 runs (``dinov2/eval/linear.py`` for
classification; the mmseg configs of its ADE20k ``linear`` and NYUd ``linear`` heads, which the
repository downloads rather than ships, for segmentation and depth), so ``--probe.protocol dinov2``
without other flags is the paper's protocol. A laptop run scales it down with ``--probe.dinov2.*``:
iteration counts and batch sizes as flags, and every fixed pixel size (crops, resizes, strides)
multiplied by ``image_scale``, which follows the backbone's input size by default. Warm-ups are
fractions of the iterations, so a shortened run keeps DINOv2's proportions (the defaults give its
1,500, 12,800 and 100 warm-up iterations).

This module is a leaf (no regablate imports beyond errors): ``regablate.probe.protocol`` holds a
``DINOv2Settings`` and the protocol code imports ``ProbeReport`` from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jsonargparse.typing import ClosedUnitInterval, PositiveFloat, PositiveInt

from regablate.errors import RegablateError

# dinov2/eval/linear.py: --learning-rates default.
DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
# The input side the protocol's pixel sizes are written for: the classification crop.
REFERENCE_SIZE = 224
# (top, bottom, left, right) rows/columns of a 480 x 640 NYUd frame: the toolbox's NYUCrop for training
# (depth/datasets/pipelines/transforms.py). The Eigen crop for scoring is the data's (regablate.data.nyud).
NYU_FRAME = (480, 640)
NYU_TRAIN_CROP = (45, 472, 43, 608)


@dataclass
class DINOv2Settings:
    """DINOv2's frozen-feature protocols; defaults are DINOv2's (see the module docstring).

    Args:
        image_scale: factor on every fixed pixel size below; default: the backbone's img_size / 224
            when below 224, else 1 (a 32 px backbone gets 32 px classification crops).
        eval_batch_size: images per backbone forward when scoring.
        cls_iterations: iterations of the classification heads (dinov2: 10 epochs x 1250).
        cls_batch_size: images per iteration, one fresh augmented view each (dinov2: 128 per GPU x 8).
        cls_lrs: base learning rates of the head grid, each scaled by cls_batch_size / 256.
        cls_n_last_blocks: numbers of last blocks whose (normed) CLS tokens a head concatenates.
        cls_crop_size: RandomResizedCrop side for training and centre-crop side for scoring (pixels).
        cls_resize_size: shorter side (bicubic) before the scoring centre crop (pixels).
        seg_iterations: iterations of the segmentation head (dinov2's ADE20k linear: 40k).
        seg_batch_size: crops per iteration (dinov2: 2 per GPU x 8).
        seg_lr: AdamW learning rate of the segmentation head.
        seg_weight_decay: AdamW weight decay of the segmentation head.
        seg_warmup: share of the iterations in linear warm-up before the poly decay (dinov2: 1500 of 40k).
        seg_short_side: shorter side images are resized to (ratio 1), the longer side kept at most 4x it (pixels).
        seg_ratio_range: random factor range of the training resize.
        seg_crop_size: training crop side and sliding-window side (pixels).
        seg_stride: sliding-window stride (pixels).
        seg_cat_max_ratio: a training crop is redrawn (up to 10 times) while one class covers this share or more.
        depth_iterations: iterations of the depth head (dinov2's NYUd linear: 38,400).
        depth_batch_size: crops per iteration (dinov2: 2 per GPU x 8).
        depth_loss_group: images per SigLoss (its variance is taken per GPU, over 2 images, in dinov2's runs).
        depth_lr: AdamW learning rate of the depth head.
        depth_weight_decay: AdamW weight decay of the depth head.
        depth_warmup: share of the iterations in linear warm-up before the cosine decay (dinov2: 12,800 of 38,400).
        depth_loss_warmup: share of the iterations trained on SigLoss's mean term only (dinov2: 100).
        depth_grad_clip: gradient-norm clip of the depth head.
        depth_min: depth of the first bin and lower clamp (metres).
        depth_max: depth of the last bin and upper clamp (metres).
        depth_bins: depth bins, uniform in [depth_min, depth_max].
        depth_crop_size: training crop (height, width) (pixels).
        depth_train_crop: region (top, bottom, left, right) of a 480 x 640 frame kept for training
            (NYUd's valid area), scaled to other frame sizes; null keeps the whole image.
        depth_flip_test: average the prediction with that of the mirrored image when scoring.
    """

    image_scale: PositiveFloat | None = None
    eval_batch_size: PositiveInt = 64
    cls_iterations: PositiveInt = 12500
    cls_batch_size: PositiveInt = 1024
    cls_lrs: Sequence[PositiveFloat] = DINOV2_LRS
    cls_n_last_blocks: Sequence[PositiveInt] = (1, 4)
    cls_crop_size: PositiveInt = 224
    cls_resize_size: PositiveInt = 256
    seg_iterations: PositiveInt = 40000
    seg_batch_size: PositiveInt = 16
    seg_lr: PositiveFloat = 1e-3
    seg_weight_decay: float = 1e-4
    seg_warmup: ClosedUnitInterval = 1500 / 40000
    seg_short_side: PositiveInt = 512
    seg_ratio_range: tuple[PositiveFloat, PositiveFloat] = (0.5, 2.0)
    seg_crop_size: PositiveInt = 512
    seg_stride: PositiveInt = 341
    seg_cat_max_ratio: ClosedUnitInterval = 0.75
    depth_iterations: PositiveInt = 38400
    depth_batch_size: PositiveInt = 16
    depth_loss_group: PositiveInt = 2
    depth_lr: PositiveFloat = 1e-4
    depth_weight_decay: float = 1e-2
    depth_warmup: ClosedUnitInterval = 12800 / 38400
    depth_loss_warmup: ClosedUnitInterval = 100 / 38400
    depth_grad_clip: PositiveFloat = 35.0
    depth_min: PositiveFloat = 1e-3
    depth_max: PositiveFloat = 10.0
    depth_bins: PositiveInt = 256
    depth_crop_size: tuple[PositiveInt, PositiveInt] = (416, 544)
    depth_train_crop: tuple[int, int, int, int] | None = NYU_TRAIN_CROP
    depth_flip_test: bool = True

    def __post_init__(self) -> None:
        if not self.cls_lrs or not self.cls_n_last_blocks:
            raise RegablateError("cls_lrs and cls_n_last_blocks need at least one value each")
        low, high = self.seg_ratio_range
        if low > high:
            raise RegablateError(f"seg_ratio_range must be (low, high) with low <= high, got {self.seg_ratio_range}")
        if self.depth_min >= self.depth_max:
            raise RegablateError(f"depth_min {self.depth_min} must be below depth_max {self.depth_max}")
        crop = self.depth_train_crop
        if crop is not None and not (0 <= crop[0] < crop[1] <= NYU_FRAME[0] and 0 <= crop[2] < crop[3] <= NYU_FRAME[1]):
            raise RegablateError(
                f"depth_train_crop {crop} is not a (top, bottom, left, right) region of a 480 x 640 frame (null: none)"
            )

    def scale_for(self, img_size: int) -> float:
        """The factor on the protocol's pixel sizes for a backbone whose input side is ``img_size``."""
        if self.image_scale is not None:
            return float(self.image_scale)
        return min(1.0, img_size / REFERENCE_SIZE)


def scaled(size: float, scale: float) -> int:
    """A pixel size of the protocol at ``scale`` (at least 1 pixel)."""
    return max(1, round(size * scale))


def frame_region(crop: Sequence[int], height: int, width: int) -> tuple[int, int, int, int]:
    """A (top, bottom, left, right) region of a 480 x 640 frame, on a ``height`` x ``width`` frame.

    On 480 x 640 (NYUd) it is ``crop`` itself; other sizes get the same fractions of the frame.
    """
    top, bottom, left, right = crop
    rows, cols = height / NYU_FRAME[0], width / NYU_FRAME[1]
    return round(top * rows), round(bottom * rows), round(left * cols), round(right * cols)
