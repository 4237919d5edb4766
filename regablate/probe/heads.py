"""The probe heads and the loop that trains them on cached features.

Why a compact loop and not a Lightning Trainer: the heads train on tensors already in
memory, in thousands of sub-millisecond steps (a few linear layers on a mini-batch of cached
tokens). Lightning's per-step overhead (~2 ms here, FACTS.md) would cost more than the steps
themselves and break the probe's budget of half a feature-extraction pass, while none of
what it brings (devices, distributed sampling, checkpointing, loggers) is needed for a
few-second job on one process. The metrics still come from torchmetrics.

What keeps a step cheap: the dense heads compute their loss at a few sampled pixels
(``PixelSampler``), not on the whole upsampled map, and the optimisers are torch's fused ones
(on heads this small the default optimiser's per-tensor work is a quarter of a step).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.regression import MeanSquaredError


def chunks(num_samples: int, size: int) -> Iterator[Tensor]:
    """Index tensors over ``num_samples`` in order, ``size`` at a time (evaluation)."""
    return iter(torch.arange(num_samples).split(size))


class LinearClassifierGrid(nn.Module):
    """``G`` feature groups x ``L`` learning rates of linear classifiers in one weight tensor.

    Inputs come stacked as (G, B, width), narrower groups zero-padded to ``width``: a padded
    input dimension contributes nothing and gets zero gradient, so its weights never move and each
    head is exactly a linear classifier on its own features. Weights start at zero, or drawn from
    N(0, ``init_std``) (DINOv2's linear heads: 0.01); biases at zero. The training loss weighs each
    head's loss by its learning rate, so its gradient is the head's own gradient times that rate
    and one SGD optimiser (lr 1, momentum) trains every head at its own rate.
    """

    lrs: Tensor

    def __init__(self, groups: int, width: int, num_classes: int, lrs: Sequence[float], init_std: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(groups, len(lrs), width, num_classes))
        if init_std:
            nn.init.normal_(self.weight, std=init_std)
        self.bias = nn.Parameter(torch.zeros(groups, len(lrs), num_classes))
        self.register_buffer("lrs", torch.tensor(lrs, dtype=torch.float32))

    def forward(self, inputs: Tensor) -> Tensor:
        """(G, B, width) -> logits (G, L, B, num_classes).

        A matmul broadcast over the learning rates: unlike the equivalent einsum it never copies
        the weight tensor (3x faster with DINOv2's 52 heads over 1000 classes).
        """
        return torch.matmul(inputs[:, None], self.weight) + self.bias[:, :, None]

    def head_losses(self, inputs: Tensor, labels: Tensor) -> Tensor:
        """Each head's mean cross-entropy (G, L)."""
        logits = self(inputs)
        heads = logits.shape[0] * logits.shape[1]
        losses = F.cross_entropy(logits.flatten(0, 2), labels.repeat(heads), reduction="none")
        return losses.view(*logits.shape[:2], -1).mean(dim=-1)

    def loss(self, inputs: Tensor, labels: Tensor) -> Tensor:
        """The training loss: heads' mean cross-entropies weighted by their learning rates, summed."""
        return self.weighted(self.head_losses(inputs, labels))

    def weighted(self, head_losses: Tensor) -> Tensor:
        """``sum_h lr_h * loss_h``: heads train independently, each at its own learning rate."""
        return (head_losses * self.lrs).sum()


class SegmentationHead(nn.Module):
    """BatchNorm + a linear map of each patch token (DINOv2's "linear" head: a 1x1 conv on the grid);
    logits upsampled bilinearly to the mask."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(width)
        self.classify = nn.Linear(width, num_classes)

    def logits(self, patches: Tensor) -> Tensor:
        """Patch tokens (B, h, w, D) -> class logits on the patch grid (B, h, w, C)."""
        return self.classify(self.norm(patches.flatten(0, 2).float())).unflatten(0, patches.shape[:3])

    def forward(self, patches: Tensor, size: tuple[int, int]) -> Tensor:
        """Patch tokens (B, h, w, D) -> class logits (B, C, H, W)."""
        logits = self.logits(patches).permute(0, 3, 1, 2)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def linear_bin_centres(min_depth: float, max_depth: float, num_bins: int) -> Tensor:
    """Centres of ``num_bins`` equal-width depth bins covering [min_depth, max_depth]."""
    edges = torch.linspace(min_depth, max_depth, num_bins + 1, dtype=torch.float64)
    return ((edges[:-1] + edges[1:]) / 2).float()


def decode_depth(logits: Tensor, centres: Tensor) -> Tensor:
    """Depth as the expected bin centre: ``sum_i softmax(logits)_i * centre_i`` over the last dimension."""
    return logits.softmax(dim=-1) @ centres


class DepthHead(nn.Module):
    """A linear head on [patch, CLS] over depth bins, decoded per patch, upsampled to the image.

    The linear map of the concatenation is written as its two halves (patch part + CLS part):
    the same function, but the CLS half is computed once per image instead of once per patch.
    """

    centres: Tensor

    def __init__(self, patch_width: int, cls_width: int, centres: Tensor) -> None:
        super().__init__()
        self.patch = nn.Linear(patch_width, len(centres))
        self.cls = nn.Linear(cls_width, len(centres), bias=False)
        self.register_buffer("centres", centres)

    def depth(self, patches: Tensor, cls: Tensor) -> Tensor:
        """Patch tokens (B, h, w, D) and CLS (B, D) -> depth on the patch grid (B, h, w)."""
        return decode_depth(self.patch(patches.float()) + self.cls(cls)[:, None, None], self.centres)

    def forward(self, patches: Tensor, cls: Tensor, size: tuple[int, int]) -> Tensor:
        """Patch tokens (B, h, w, D) and CLS (B, D) -> depth (B, H, W)."""
        depth = self.depth(patches, cls)[:, None]
        return F.interpolate(depth, size=size, mode="bilinear", align_corners=False)[:, 0]


class PixelSampler:
    """Random pixels of ``size`` images, and the values there of a patch grid upsampled as
    ``F.interpolate(mode="bilinear", align_corners=False)`` upsamples it.

    The heads' losses are defined on the upsampled map, as DINOv2's linear evaluation defines
    them; a loss over random pixels is an unbiased estimate of it (the sampled-point loss of
    PointRend and Mask2Former) at the cost of those pixels instead of the whole image.
    ``F.grid_sample`` with border padding evaluates that upsampling at any point.
    """

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def draw(self, num_images: int, per_image: int) -> tuple[Tensor, Tensor]:
        """Uniform random pixel rows and columns, each ``(num_images, per_image)``."""
        return torch.randint(self.size[0], (num_images, per_image)), torch.randint(
            self.size[1], (num_images, per_image)
        )

    def __call__(self, values: Tensor, ys: Tensor, xs: Tensor) -> Tensor:
        """Grid values (B, h, w) or (B, h, w, C) -> the upsampled map's values at pixels (ys, xs): (B, P[, C])."""
        height, width = self.size
        # Pixel centres in grid_sample's [-1, 1] coordinates, as (x, y) points: (B, 1, P, 2).
        points = torch.stack([(xs + 0.5) * (2 / width) - 1, (ys + 0.5) * (2 / height) - 1], dim=-1)[:, None]
        channels = values if values.dim() == 4 else values[..., None]
        sampled = F.grid_sample(
            channels.permute(0, 3, 1, 2),
            points.to(values.dtype),
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        )[:, :, 0].transpose(1, 2)  # (B, P, C)
        return sampled if values.dim() == 4 else sampled[..., 0]


def valid_depth(depth: Tensor) -> Tensor:
    """Pixels with a ground-truth depth: finite and positive (NYUd marks missing depth with 0)."""
    return torch.isfinite(depth) & (depth > 0)


def miou_metric(num_classes: int, ignore_index: int | None) -> MulticlassJaccardIndex:
    """Dataset-level mIoU: per-class IoU from the confusion matrix summed over all images, averaged.

    The heads are scored by one process (rank 0 of a probe's devices): no sync with other ranks.
    """
    return MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index, sync_on_compute=False)


def rmse_metric() -> MeanSquaredError:
    """Root mean squared error over all valid pixels of all images (one process, like ``miou_metric``)."""
    return MeanSquaredError(squared=False, sync_on_compute=False)
