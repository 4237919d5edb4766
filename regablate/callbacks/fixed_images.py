"""The base of the artifact callbacks: a fixed batch of validation images, measured on rank zero."""

from __future__ import annotations

from typing import Any, cast

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from regablate.data.common import IMAGENET_MEAN, IMAGENET_STD
from regablate.errors import RegablateError
from regablate.models.layout import Backbone, is_backbone


class FixedImagesCallback(Callback):
    """Measure ``pl_module.backbone`` on the same images at train start, every ``every_n_steps``
    optimiser steps (``None``: never) and at every validation end (not the sanity check).

    The images are the first ``num_images`` samples of the datamodule's own validation loader,
    drawn once at setup, so every measurement of a run sees the same images. Under DDP only
    global rank zero draws, measures and logs; the other ranks do nothing, so the numbers
    cover those images only, never the other ranks' shards. Subclasses implement ``measure``.
    """

    def __init__(self, num_images: int, every_n_steps: int | None) -> None:
        if num_images < 1:
            raise RegablateError(f"{type(self).__name__}: num_images must be at least 1, got {num_images}")
        if every_n_steps is not None and every_n_steps < 1:
            raise RegablateError(
                f"{type(self).__name__}: every_n_steps must be at least 1 or null, got {every_n_steps}"
            )
        self.num_images = num_images
        self.every_n_steps = every_n_steps
        self.batch: dict[str, Tensor] | None = None
        self.last_step: int | None = None

    def measure(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        raise NotImplementedError

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate") or not trainer.is_global_zero:
            return
        if not is_backbone(getattr(pl_module, "backbone", None)):
            raise RegablateError(f"{type(self).__name__} needs a task with a timm ViT in .backbone")
        if self.batch is None:
            self.batch = draw_validation_images(trainer, self.num_images)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._maybe_measure(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._maybe_measure(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._maybe_measure(trainer, pl_module)

    def _maybe_measure(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Measure once per optimiser step (accumulation and validation may ask again)."""
        if trainer.is_global_zero and self.batch is not None and self.last_step != trainer.global_step:
            self.last_step = trainer.global_step
            self.measure(trainer, pl_module, trainer.global_step)

    def images(self, pl_module: LightningModule) -> tuple[Tensor, Tensor | None]:
        """The fixed images on the module's device (moved once), and their segmentation if any."""
        assert self.batch is not None
        if self.batch["image"].device != pl_module.device:
            self.batch = {key: value.to(pl_module.device) for key, value in self.batch.items()}
        return self.batch["image"], self.batch.get("mask")


def backbone_of(pl_module: LightningModule) -> Backbone:
    """The backbone of a regablate task (the callbacks measure it)."""
    backbone = getattr(pl_module, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise RegablateError(f"{type(pl_module).__name__} has no backbone: the callback needs a regablate task")
    return cast(Backbone, backbone)


def draw_validation_images(trainer: Trainer, num_images: int) -> dict[str, Tensor]:
    """The first ``num_images`` validation samples (``image``, and ``mask`` when the data has one)."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        raise RegablateError(
            "the artifact callbacks draw their images from a datamodule's validation data; use a datamodule"
        )
    batches, count = [], 0
    for batch in datamodule.val_dataloader():
        if not isinstance(batch, dict) or "image" not in batch:
            raise RegablateError("the artifact callbacks need batches that are dicts with an 'image' key")
        batches.append(batch)
        count += len(batch["image"])
        if count >= num_images:
            break
    if not batches:
        raise RegablateError("the validation data is empty: the artifact callbacks have no images to measure")
    keys = [key for key in ("image", "mask") if all(key in batch for batch in batches)]
    return {key: torch.cat([batch[key] for batch in batches])[:num_images].clone() for key in keys}


def normalisation(trainer: Trainer) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The datamodule's ``mean``/``std`` (ImageNet's when it has none), to show images as they were."""
    datamodule = getattr(trainer, "datamodule", None)
    return tuple(getattr(datamodule, "mean", IMAGENET_MEAN)), tuple(getattr(datamodule, "std", IMAGENET_STD))


def tensorboards(trainer: Trainer) -> list[SummaryWriter]:
    """The SummaryWriters of the trainer's TensorBoard loggers (for histograms and images)."""
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
