"""The image transforms of DINOv2's three protocols, on raw samples (``regablate.probe.dinov2.data``).

Each view is a picklable callable from a raw sample (image float32 (3, H, W) in [0, 1]) to the
tensors one training or scoring step needs, images normalised last:

* classification (``dinov2/data/transforms.py``): training ``RandomResizedCrop(224, bicubic)`` +
  horizontal flip; scoring ``Resize(256, bicubic)`` (shorter side) + ``CenterCrop(224)``;
* segmentation (the mmseg config of dinov2's ADE20k linear head): ``Resize(img_scale=(2048, 512),
  ratio_range=(0.5, 2.0))`` keeping the aspect ratio, ``RandomCrop(512, cat_max_ratio=0.75)``,
  ``RandomFlip(0.5)``, ``PhotoMetricDistortion``, normalise, ``Pad(512)`` with the ignore label;
  scoring resizes to ``img_scale`` (ratio 1) for the sliding windows, the mask stays as stored;
* depth (the Monocular-Depth-Estimation-Toolbox pipeline of dinov2's NYUd linear head):
  ``NYUCrop``, ``RandomRotate(0.5, 2.5 degrees)``, ``RandomFlip(0.5)``, ``RandomCrop(416, 544)``,
  ``ColorAug(0.5)``, normalise; scoring uses the whole image and the depth map as stored.

Randomness comes from torch's generator (seeded by the protocol, and per DataLoader worker).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from regablate.data.dense import INVALID_DEPTH
from regablate.probe.dinov2.data import IGNORE
from regablate.probe.dinov2.settings import frame_region
from regablate.probe.heads import valid_depth


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _coin(p: float = 0.5) -> bool:
    return bool(torch.rand(()) < p)


def _clamp_unit(image: Tensor) -> Tensor:
    return image.clamp(0.0, 1.0)  # bicubic resampling overshoots [0, 1]


def _image(sample: dict[str, Any]) -> Tensor:
    return torch.as_tensor(sample["image"]).as_subclass(Tensor).float()


class ClassificationTrainView:
    """A fresh RandomResizedCrop (bicubic, scale 0.08-1, ratio 3/4-4/3) and a flip of p = 0.5."""

    def __init__(self, crop: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(crop, interpolation=InterpolationMode.BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(0.5),
                v2.Lambda(_clamp_unit),
                v2.Normalize(mean, std),
            ]
        )

    def __call__(self, sample: dict[str, Any]) -> dict[str, Tensor]:
        return {"image": self.transform(_image(sample)), "label": torch.as_tensor(sample["label"]).long()}


class ClassificationEvalView:
    """Resize of the shorter side to ``resize`` (bicubic), then a centre crop of ``crop``."""

    def __init__(self, resize: int, crop: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.transform = v2.Compose(
            [
                v2.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True),
                v2.CenterCrop(crop),
                v2.Lambda(_clamp_unit),
                v2.Normalize(mean, std),
            ]
        )

    def __call__(self, sample: dict[str, Any]) -> dict[str, Tensor]:
        return {"image": self.transform(_image(sample)), "label": torch.as_tensor(sample["label"]).long()}


def rescale_size(height: int, width: int, long_side: float, short_side: float) -> tuple[int, int]:
    """mmcv's ``imrescale`` size: the largest scale keeping longer side <= ``long_side``, shorter <= ``short_side``."""
    factor = min(long_side / max(height, width), short_side / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


class SegmentationLabels:
    """Stored mask values to training class ids: ``ignore_index`` becomes ``IGNORE``.

    When ``ignore_index`` is itself a class id of the stored masks (ADE20k's 0, "other"), the ids
    above it move down by one (mmseg's ``reduce_zero_label``): 151 stored values give 150 classes.
    """

    def __init__(self, num_stored: int, ignore_index: int | None) -> None:
        self.ignore_index = ignore_index
        self.reduces = ignore_index is not None and 0 <= ignore_index < num_stored
        self.num_classes = num_stored - 1 if self.reduces else num_stored

    def __call__(self, mask: Any) -> Tensor:
        mask = torch.as_tensor(mask).as_subclass(Tensor).long()
        if self.ignore_index is None:
            return mask
        ignored = mask == self.ignore_index
        if self.reduces:
            mask = torch.where(mask > self.ignore_index, mask - 1, mask)
        return mask.masked_fill(ignored, IGNORE)


def photometric_distortion(image: Tensor) -> Tensor:
    """mmseg's ``PhotoMetricDistortion`` on an image in [0, 1] (its 0-255 deltas divided by 255).

    Brightness ``+ U(-32, 32)``, contrast ``* U(0.5, 1.5)`` (before or after the colour changes, at
    random), saturation ``* U(0.5, 1.5)`` and hue ``+ U{-18..17}`` of OpenCV's 180 hue steps (numpy's
    ``randint(-18, 18)``), each with p = 0.5, clipped to the range after each step. Saturation is
    torchvision's blend with the grey image, where mmseg scales the HSV saturation channel (the same
    direction and range).
    """
    if _coin():
        image = (image + _uniform(-32, 32) / 255).clamp(0, 1)
    contrast_first = _coin()
    if contrast_first and _coin():
        image = (image * _uniform(0.5, 1.5)).clamp(0, 1)
    if _coin():
        image = TF.adjust_saturation(image, _uniform(0.5, 1.5)).clamp(0, 1)
    if _coin():
        image = TF.adjust_hue(image, int(torch.randint(-18, 18, ())) / 180)
    if not contrast_first and _coin():
        image = (image * _uniform(0.5, 1.5)).clamp(0, 1)
    return image


class SegmentationTrainView:
    """One random training crop (see the module docstring): image (3, crop, crop), mask (crop, crop)."""

    def __init__(
        self,
        labels: SegmentationLabels,
        short_side: int,
        ratio_range: tuple[float, float],
        crop: int,
        cat_max_ratio: float,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.labels, self.short_side, self.ratio_range, self.crop = labels, short_side, ratio_range, crop
        self.cat_max_ratio = cat_max_ratio
        self.normalize = v2.Normalize(mean, std)

    def _crop_box(self, height: int, width: int) -> tuple[int, int]:
        top = int(torch.randint(max(height - self.crop, 0) + 1, ()))
        left = int(torch.randint(max(width - self.crop, 0) + 1, ()))
        return top, left

    def __call__(self, sample: dict[str, Any]) -> dict[str, Tensor]:
        image, mask = _image(sample), self.labels(sample["mask"])
        ratio = _uniform(*self.ratio_range)
        size = rescale_size(image.shape[-2], image.shape[-1], 4 * self.short_side * ratio, self.short_side * ratio)
        image = TF.resize(image, list(size), InterpolationMode.BILINEAR, antialias=False).clamp(0, 1)
        mask = TF.resize(mask[None], list(size), InterpolationMode.NEAREST)[0]
        top, left = self._crop_box(*size)
        if self.cat_max_ratio < 1:  # mmseg RandomCrop: redraw up to 10 times while one class dominates
            for _ in range(10):
                window = mask[top : top + self.crop, left : left + self.crop]
                counts = torch.unique(window[window != IGNORE], return_counts=True)[1]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                top, left = self._crop_box(*size)
        image = image[:, top : top + self.crop, left : left + self.crop]
        mask = mask[top : top + self.crop, left : left + self.crop]
        if _coin():
            image, mask = image.flip(-1), mask.flip(-1)
        image = self.normalize(photometric_distortion(image))
        pad = (0, self.crop - image.shape[-1], 0, self.crop - image.shape[-2])
        return {
            "image": torch.nn.functional.pad(image, pad, value=0.0),
            "mask": torch.nn.functional.pad(mask, pad, value=IGNORE),
        }


class SegmentationEvalView:
    """The image resized for the sliding windows (ratio 1 of the training scale), the mask as stored."""

    def __init__(
        self, labels: SegmentationLabels, short_side: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.labels, self.short_side = labels, short_side
        self.normalize = v2.Normalize(mean, std)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Tensor]:
        image = _image(sample)
        size = rescale_size(image.shape[-2], image.shape[-1], 4 * self.short_side, self.short_side)
        image = TF.resize(image, list(size), InterpolationMode.BILINEAR, antialias=False).clamp(0, 1)
        return {"image": self.normalize(image), "mask": self.labels(sample["mask"])}


def color_augmentation(image: Tensor) -> Tensor:
    """The toolbox's ``ColorAug(prob=0.5, gamma 0.9-1.1, brightness 0.75-1.25, colour 0.9-1.1)``.

    As there, the gamma applies to 0-255 pixel values (``image ** gamma`` on the uint8 image), then
    brightness and a per-channel colour factor, clipped to 0-255 once at the end.
    """
    if not _coin():
        return image
    pixels = (image * 255) ** _uniform(0.9, 1.1) * _uniform(0.75, 1.25)
    colours = torch.tensor([_uniform(0.9, 1.1) for _ in range(3)]).view(3, 1, 1)
    return (pixels * colours).clamp(0, 255) / 255


class DepthTrainView:
    """One random training crop (see the module docstring): image (3, h, w), depth (h, w), 0 = unknown."""

    def __init__(
        self,
        frame: tuple[int, int, int, int] | None,
        crop: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        degrees: float = 2.5,
    ) -> None:
        self.frame, self.crop, self.degrees = frame, crop, degrees
        self.normalize = v2.Normalize(mean, std)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Tensor]:
        image, depth = _image(sample), known_depth(sample["depth"])
        if self.frame is not None:
            top, bottom, left, right = frame_region(self.frame, *depth.shape[-2:])
            image, depth = image[:, top:bottom, left:right], depth[top:bottom, left:right]
        if _coin():  # RandomRotate: image bilinear, depth nearest, both filled with 0
            angle = _uniform(-self.degrees, self.degrees)
            image = TF.rotate(image, angle, InterpolationMode.BILINEAR, fill=0.0)
            depth = TF.rotate(depth[None], angle, InterpolationMode.NEAREST, fill=0.0)[0]
        if _coin():
            image, depth = image.flip(-1), depth.flip(-1)
        height, width = depth.shape
        top = int(torch.randint(max(height - self.crop[0], 0) + 1, ()))
        left = int(torch.randint(max(width - self.crop[1], 0) + 1, ()))
        image = image[:, top : top + self.crop[0], left : left + self.crop[1]]
        depth = depth[top : top + self.crop[0], left : left + self.crop[1]]
        return {"image": self.normalize(color_augmentation(image)), "depth": depth}


class DepthEvalView:
    """The whole image, normalised, and its depth map as stored."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.normalize = v2.Normalize(mean, std)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Tensor]:
        return {"image": self.normalize(_image(sample)), "depth": known_depth(sample["depth"])}


def known_depth(depth: Any) -> Tensor:
    """A depth map as float32 with every pixel without ground truth (``valid_depth`` false) set to ``INVALID_DEPTH``
    (0, the toolbox's "no depth"; data from ``HFDataModule`` already are)."""
    depth = torch.as_tensor(depth).as_subclass(Tensor).float()
    return torch.where(valid_depth(depth), depth, torch.tensor(INVALID_DEPTH))
