"""Frozen features of one data split, extracted in a single backbone pass.

A :class:`FeatureSet` holds everything every probe needs, so no head ever runs the backbone
again: the CLS token, the patch tokens on their grid, the last block's attention keys of the
patches (for LOST) and the split's targets. Registers are dropped here, at the source: no
tensor in a FeatureSet carries a register token, so no patch-level head can see one.

Patch tensors are stored in float16 (half the memory and cache size; the heads compute in
float32), whether or not they went through the cache, so cached and fresh runs agree exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Protocol

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from regablate.errors import RegablateError
from regablate.models.backbone import extract_features

# Batch keys a probe may use as targets, and the probe that needs each.
TARGET_KEYS = ("label", "mask", "depth", "box")
PATCH_DTYPE = torch.float16


@dataclass
class BatchFeatures:
    """What an extractor returns for one batch of images."""

    cls: Tensor  # (B, D)
    patches: Tensor  # (B, h, w, D) patch tokens on their grid, after the final norm
    keys: Tensor  # (B, h, w, Dk) last-block attention keys of the patch tokens


class Extractor(Protocol):
    """Anything that maps normalised images (B, 3, H, W) to :class:`BatchFeatures`."""

    def __call__(self, images: Tensor) -> BatchFeatures: ...


class ViTExtractor(nn.Module):
    """Frozen features of a timm ViT: final CLS and patch tokens, and last-block keys.

    The keys come from a forward hook on the last block's ``attn.qkv``, which sees that
    block's normed input, during the same pass that yields the tokens. Register tokens are
    sliced off both.
    """

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        qkv = getattr(getattr(model.blocks[-1], "attn", None), "qkv", None)
        if not isinstance(qkv, nn.Linear):
            raise RegablateError(
                f"{type(model).__name__}'s last block has no fused attn.qkv layer, which LOST reads the keys from"
            )
        self.model = model.eval().requires_grad_(False)
        self._keys: Tensor | None = None
        qkv.register_forward_hook(self._keep_keys)

    def _keep_keys(self, module: nn.Module, inputs: tuple[Tensor], output: Tensor) -> None:
        width = output.shape[-1] // 3  # qkv is [q | k | v] along the last dimension
        self._keys = output[:, self.model.num_prefix_tokens :, width : 2 * width]

    @torch.inference_mode()
    def forward(self, images: Tensor) -> BatchFeatures:
        tokens = extract_features(self.model, images)
        keys, self._keys = self._keys, None
        assert keys is not None, "the attn.qkv hook did not run"
        grid = tuple(self.model.patch_embed.dynamic_feat_size(images.shape[-2:]))
        return BatchFeatures(cls=tokens.pooled, patches=_on_grid(tokens.patches, grid), keys=_on_grid(keys, grid))


def _on_grid(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    return tokens.reshape(tokens.shape[0], *grid, tokens.shape[-1])


@dataclass
class FeatureSet:
    """Features and targets of one split; a target is ``None`` when the data lack it.

    ``cls`` (N, D) float32; ``patches`` (N, h, w, D) and ``keys`` (N, h, w, Dk) float16
    (``keys`` only where LOST runs, else ``None``); ``label`` (N,); ``mask`` (N, H, W)
    integer class ids; ``depth`` (N, H, W); ``box`` (N, 4) xyxy pixels.
    """

    cls: Tensor
    patches: Tensor
    keys: Tensor | None = None
    label: Tensor | None = None
    mask: Tensor | None = None
    depth: Tensor | None = None
    box: Tensor | None = None

    def to_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def mean_patch(self) -> Tensor:
        """The mean patch token (N, D), registers excluded."""
        return self.patches.float().mean(dim=(1, 2))


def extract_split(extractor: Extractor, batches: Iterable[dict[str, Tensor]], keep_keys: bool) -> FeatureSet:
    """Run ``extractor`` once over ``batches``; keep its features and every target the batches carry."""
    parts: dict[str, list[Tensor]] = {}
    for batch in batches:
        out = extractor(batch["image"])
        found = {"cls": out.cls.float(), "patches": out.patches.to(PATCH_DTYPE)}
        if keep_keys:
            found["keys"] = out.keys.to(PATCH_DTYPE)
        found.update({key: batch[key] for key in TARGET_KEYS if key in batch})
        for key, value in found.items():
            parts.setdefault(key, []).append(value.detach().cpu())
    if not parts:
        raise RegablateError("the split holds no samples: nothing to probe")
    merged = {key: torch.cat(values) for key, values in parts.items()}
    if "mask" in merged:
        merged["mask"] = _compact_ids(merged["mask"])
    return FeatureSet(**merged)


def _compact_ids(mask: Tensor) -> Tensor:
    """Class-id masks in uint8 where they fit (ADE20k, VOC, the synthetic scenes), int32 otherwise."""
    fits = mask.numel() == 0 or (mask.min() >= 0 and mask.max() <= 255)
    return mask.to(torch.uint8 if fits else torch.int32)
