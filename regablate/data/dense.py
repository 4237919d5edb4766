"""Dense targets (segmentation masks, depth maps) through torchvision's v2 transforms.

Masks and depth maps travel with the image as ``tv_tensors`` so one random draw crops and flips
them all; both are resized with nearest neighbours (no invented class ids or depths at object
edges). ``Depth`` is a ``Mask`` for the kernels, and a type of its own for the padding fill, so
padding writes the ignore value into masks and 0 (invalid) into depth maps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

# A depth of 0 marks a pixel without ground truth: never trained on, never scored (NYUd's own convention).
INVALID_DEPTH = 0.0


class Depth(tv_tensors.Mask):
    """A depth map (H, W) float32: transformed like a mask (nearest neighbours), padded with ``INVALID_DEPTH``."""


def clean_depth(depth: np.ndarray, scale: float, max_depth: float | None) -> np.ndarray:
    """Stored depth values times ``scale``; non-finite, non-positive and beyond ``max_depth`` set to 0 (invalid)."""
    depth = depth.astype(np.float32) * np.float32(scale)
    invalid = ~np.isfinite(depth) | (depth <= 0)
    if max_depth is not None:
        invalid |= depth > max_depth
    depth[invalid] = INVALID_DEPTH
    return depth


class PadToSquare(v2.Transform):
    """Pad the image and its targets, centred, to a ``size`` x ``size`` square.

    The image gets 0 (black, before normalisation), masks ``ignore_index`` and depth maps
    ``INVALID_DEPTH``, so no padded pixel is trained on or scored.
    """

    def __init__(self, size: int, ignore_index: int) -> None:
        super().__init__()
        self.size = size
        self.fill = {tv_tensors.Image: 0, tv_tensors.Mask: ignore_index, Depth: INVALID_DEPTH, "others": 0}

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = query_size(flat_inputs)
        dh, dw = max(0, self.size - height), max(0, self.size - width)
        return {"padding": [dw // 2, dh // 2, dw - dw // 2, dh - dh // 2]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        fill = self.fill.get(type(inpt), self.fill["others"])
        return self._call_kernel(F.pad, inpt, padding=params["padding"], fill=fill)


def as_target(array: np.ndarray, kind: str) -> torch.Tensor:
    """A 2-D mask (int64 class ids) or depth map (float32) as its tv_tensor."""
    if kind == "mask":
        return tv_tensors.Mask(torch.from_numpy(array.astype(np.int64)))
    return Depth(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)))
