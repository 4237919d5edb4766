"""iBOT's block-wise masks of the student's global crops, as DINOv2 draws them.

DINOv2 (``dinov2/data/masking.py`` ``MaskingGenerator``, ``dinov2/data/collate.py``) masks
``int(crops * mask_sample_probability)`` of a batch's global crops, the others not at all; the masked
crops' ratios are stratified over ``mask_ratio_min_max`` (crop i draws its ratio uniformly in the
i-th of that many equal slices) and the strata are shuffled over the crops. A crop's mask is grown
from rectangles of at least 4 patches and aspect ratio in [0.3, 1/0.3], each adding at most half the
grid, until the crop's count is reached or no rectangle fits.

Here the plan (which crop gets which count) is drawn for the global batch and each rank keeps the
rows of its own samples, and each mask comes from a random source of its own (the step's seed and
the crop's index in the global batch): a rank builds only its own masks, and every image gets the
same mask on any number of devices.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from regablate.tasks.losses import patch_weights

# DINOv2's MaskingGenerator as its train.py builds it.
MIN_BLOCK_PATCHES = 4
MIN_ASPECT = 0.3
MAX_BLOCK_FRACTION = 0.5  # of the grid's patches
ATTEMPTS = 10


def block_mask(height: int, width: int, count: int, rng: random.Random) -> np.ndarray:
    """A (height, width) bool mask of about ``count`` patches grown from random rectangles (DINOv2's rule)."""
    mask = np.zeros((height, width), dtype=bool)
    max_block = MAX_BLOCK_FRACTION * height * width
    log_aspect = (math.log(MIN_ASPECT), math.log(1 / MIN_ASPECT))
    masked = 0
    while masked < count:
        budget = min(count - masked, max_block)
        added = 0
        for _ in range(ATTEMPTS):
            area = rng.uniform(MIN_BLOCK_PATCHES, budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:  # it adds patches, and not too many
                    block[:] = True
                    added = new
            if added:
                break
        if not added:
            break
        masked += added
    return mask


@dataclass
class Masks:
    """One step's masks of the local global crops, with what iBOT needs from them, all built on the CPU.

    ``masks`` (C, N) bool for the C = 2 x batch global crops (crop 1 of every image, then crop 2);
    ``indices`` the flat indices of the masked patches in (C * N); ``weights`` their loss weights
    (:func:`regablate.tasks.losses.patch_weights`).
    """

    masks: Tensor
    indices: Tensor
    weights: Tensor

    @classmethod
    def of(cls, masks: Tensor) -> Masks:
        return cls(masks=masks, indices=masks.flatten().nonzero().flatten(), weights=patch_weights(masks))

    def to(self, device: torch.device) -> Masks:
        non_blocking = device.type == "cuda"
        return Masks(*(t.to(device, non_blocking=non_blocking) for t in (self.masks, self.indices, self.weights)))


def draw_masks(
    batch: int,
    grid: tuple[int, int],
    ratio: tuple[float, float],
    probability: float,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> Masks:
    """The masks of this rank's ``2 * batch`` global crops (crop 1 of each of its images, then crop 2).

    The global batch holds ``batch * world_size`` images, dealt ``rank::world_size`` like the samples.
    """
    height, width = grid
    patches = height * width
    per_crop = batch * world_size
    total = 2 * per_crop
    generator = torch.Generator().manual_seed(seed)
    num_masked = int(total * probability)
    bounds = torch.linspace(ratio[0], ratio[1], num_masked + 1, dtype=torch.float64)
    draws = torch.rand(num_masked, generator=generator, dtype=torch.float64)
    ratios = bounds[:-1] + draws * (bounds[1:] - bounds[:-1])
    counts = torch.zeros(total, dtype=torch.long)
    counts[:num_masked] = (patches * ratios).long()
    counts = counts[torch.randperm(total, generator=generator)]  # which crop gets which stratum
    rows = [crop * per_crop + index for crop in range(2) for index in range(rank, per_crop, world_size)]
    masks = np.zeros((len(rows), height, width), dtype=bool)
    for i, row in enumerate(rows):
        if counts[row] > 0:
            masks[i] = block_mask(height, width, int(counts[row]), random.Random(seed * 1_000_003 + row))
    return Masks.of(torch.from_numpy(masks).flatten(1))
