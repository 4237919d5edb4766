"""The frozen backbone as DINOv2's evaluations call theirs: the last blocks' tokens at any input size.

DINOv2's evaluations read ``get_intermediate_layers(x, n, reshape=True, return_class_token=True,
norm=...)`` (``dinov2/models/vision_transformer.py``): per block, the patch tokens on their grid
and the CLS token, registers dropped, after the final LayerNorm (``norm=True``: classification,
``dinov2/eval/utils.py`` ``ModelWithIntermediateLayers``; segmentation, the notebook's
``create_segmenter``) or before it (``norm=False``: depth, ``dinov2/hub/depthers.py``). Images
whose sides are not multiples of the patch size are zero-padded on both sides first
(``dinov2/hub/utils.py`` ``CenterPadding``), and the position embedding is interpolated to any
grid. timm's ``forward_intermediates`` returns the same tokens; its ``dynamic_img_size`` mode
resamples the position embedding per input size (at the model's own size it is unchanged).

The batch is moved to ``device`` (``non_blocking``) and the backbone runs under ``autocast``
(DINOv2: the teacher's precision); features come back as float32, as the heads compute in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import cast

import torch
import torch.nn.functional as F
from timm.layers import Format
from torch import Tensor

from regablate.models.layout import Backbone

Autocast = Callable[[], AbstractContextManager]


def center_padding(size: int, multiple: int) -> tuple[int, int]:
    """(before, after) zero padding that brings ``size`` to a multiple of ``multiple`` (dinov2's CenterPadding)."""
    pad = math.ceil(size / multiple) * multiple - size
    return pad // 2, pad - pad // 2


def pad_to_patches(images: Tensor, patch: tuple[int, int]) -> Tensor:
    """``images`` (B, C, H, W) centre-padded with zeros to multiples of the patch size."""
    top, bottom = center_padding(images.shape[-2], patch[0])
    left, right = center_padding(images.shape[-1], patch[1])
    return F.pad(images, (left, right, top, bottom)) if top or bottom or left or right else images


@contextmanager
def any_input_size(model: Backbone) -> Iterator[Backbone]:
    """``model`` in timm's ``dynamic_img_size`` mode for the block: any input size, position embedding resampled."""
    embed = model.patch_embed
    saved = (model.dynamic_img_size, embed.strict_img_size, embed.flatten, embed.output_fmt)
    # timm declares dynamic_img_size Final (set at construction); switching it for a block is the point here
    model.dynamic_img_size, embed.strict_img_size, embed.flatten, embed.output_fmt = True, False, False, Format.NHWC  # type: ignore[misc]
    try:
        yield model
    finally:
        model.dynamic_img_size, embed.strict_img_size, embed.flatten, embed.output_fmt = saved  # type: ignore[misc]


class FrozenBackbone:
    """A ViT in eval mode on ``device``, without gradients, returning its last blocks' tokens.

    ``autocast`` is a factory of the context the backbone runs in (default: none; on a GPU,
    the device piece of the probe passes its bf16/fp16 autocast).
    """

    def __init__(self, model: Backbone, device: torch.device | None = None, autocast: Autocast | None = None) -> None:
        self.device = torch.device("cpu") if device is None else device
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.autocast = autocast or nullcontext
        self.patch = tuple(model.patch_embed.patch_size)
        self.width = model.embed_dim
        self.depth = len(model.blocks)

    @torch.no_grad()
    def last_blocks(self, images: Tensor, n: int, norm: bool) -> list[tuple[Tensor, Tensor]]:
        """(patches (B, D, h, w), CLS (B, D)) of each of the last ``n`` blocks, in block order, as float32."""
        images = pad_to_patches(images.to(self.device, non_blocking=True), self.patch)
        with self.autocast(), any_input_size(self.model):
            blocks = cast(
                "list[tuple[Tensor, Tensor]]",  # (patches, prefix) per block with return_prefix_tokens
                self.model.forward_intermediates(
                    images, indices=n, return_prefix_tokens=True, norm=norm, output_fmt="NCHW", intermediates_only=True
                ),
            )
        return [(patches.float(), prefix[:, 0].float()) for patches, prefix in blocks]
