"""``AttentionMaps``: where the global query (CLS) and the registers look, as a TensorBoard image grid."""

from __future__ import annotations

from jsonargparse.typing import PositiveInt
from lightning import LightningModule, Trainer

from regablate.artifacts.pictures import attention_grid, unnormalize
from regablate.artifacts.scan import scan
from regablate.callbacks.fixed_images import FixedImagesCallback, backbone_of, normalisation, tensorboards


class AttentionMaps(FixedImagesCallback):
    """Log ``attention/cls``: for a few fixed validation images, one row each: the image, the last
    block's CLS-to-patch attention (head mean), then each register's attention to the patches.
    A ViT without a class token shows its global query instead: the attention pool's query for
    ``map`` models (SigLIP), the attention the patches receive from the patches for avg-pooled
    ones (``regablate.artifacts.scan``).

    Artifacts show as bright spots on background in the CLS map; registers take them over.
    Measured at train start, at every validation end and every ``every_n_steps`` steps when set,
    on rank zero's fixed images only (see ``FixedImagesCallback``). The attention probabilities
    are computed for that one pass; training keeps timm's fused attention.

    Args:
        num_images: validation images shown (rows of the grid).
        every_n_steps: also log every this many optimiser steps (null: validation ends only).
    """

    def __init__(self, num_images: PositiveInt = 8, every_n_steps: PositiveInt | None = None) -> None:
        super().__init__(num_images, every_n_steps)

    def measure(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        writers = tensorboards(trainer)
        if not writers:
            return
        images, _ = self.images(pl_module)
        maps = scan(backbone_of(pl_module), images, blocks=[-1]).attention_maps
        grid = attention_grid(unnormalize(images.cpu(), *normalisation(trainer)), maps)
        for writer in writers:
            writer.add_image("attention/cls", grid, step)
