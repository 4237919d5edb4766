"""Supervised fine-tuning of a register ViT with a linear classification head."""

from __future__ import annotations

from typing import Any, Literal

import torch
from jsonargparse.typing import ClosedUnitInterval, PositiveInt
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from regablate.errors import RegablateError
from regablate.models.backbone import extract_features
from regablate.tasks.base import BackboneTask
from regablate.tasks.optim import require_finite

Pool = Literal["cls", "mean", "cls+mean"]


class Classification(BackboneTask):
    """Fine-tune a timm ViT with ``num_registers`` registers on an image-classification dataset.

    Batches are dicts with ``image`` (B, 3, H, W) and ``label`` (B,). Logs ``train/loss``,
    ``{train,val,test}/top1`` (and ``top5`` with more than five classes), ``val/loss`` and
    ``test/loss``. Registers never enter the head: ``mean`` pools the patch tokens only, and
    ``cls`` is the backbone's global feature: the CLS token, or for a ViT without one its own
    pooling of the patch tokens (``avg``, or the attention pool of ``map`` models).
    """

    def __init__(
        self,
        num_classes: PositiveInt = 10,
        pool: Pool = "cls",
        freeze_backbone: bool = False,
        label_smoothing: ClosedUnitInterval = 0.0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            num_classes: classes of the dataset (must match the data module's).
            pool: head input: the CLS token (the pooled feature without one), the mean patch token, or both.
            freeze_backbone: train the head only (a linear probe trained end to end).
            label_smoothing: cross-entropy label smoothing.
            **kwargs: the backbone and optimiser arguments of ``BackboneTask``.
        """
        super().__init__(**kwargs)

    def configure_models(self) -> None:
        hp = self.hparams
        if hp.num_classes < 2:
            raise RegablateError(f"num_classes must be at least 2, got {hp.num_classes}")
        self.backbone = self.make_backbone()
        if hp.freeze_backbone:
            self.backbone.requires_grad_(False)
        width = self.backbone.embed_dim * (2 if hp.pool == "cls+mean" else 1)
        self.head = nn.Linear(width, hp.num_classes)
        self.loss = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)

    def configure_metrics(self) -> None:
        num_classes = self.hparams.num_classes
        metrics: dict[str, Metric | MetricCollection] = {
            "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro")
        }
        if num_classes > 5:
            metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        collection = MetricCollection(metrics)
        self.train_metrics = collection.clone(prefix="train/")
        self.val_metrics = collection.clone(prefix="val/")
        self.test_metrics = collection.clone(prefix="test/")

    def forward(self, images: Tensor) -> Tensor:
        features = extract_features(self.backbone, images)
        pool = self.hparams.pool
        if pool == "cls":
            pooled = features.pooled
        elif pool == "mean":
            pooled = features.patches.mean(dim=1)
        else:
            pooled = torch.cat([features.pooled, features.patches.mean(dim=1)], dim=-1)
        return self.head(pooled)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.hparams.num_classes:
            raise RegablateError(
                f"the data has {data_classes} classes but model.num_classes is {self.hparams.num_classes}; "
                "set them to the same value"
            )

    def _step(self, batch: dict[str, Tensor], metrics: MetricCollection, stage: str) -> Tensor:
        logits = self(batch["image"])
        loss = self.loss(logits, batch["label"])
        metrics.update(logits, batch["label"])
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=not on_step, prog_bar=True, sync_dist=not on_step)
        self.log_dict(metrics, on_step=on_step, on_epoch=not on_step, prog_bar=stage != "train")
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._step(batch, self.train_metrics, "train")
        require_finite(loss, self.global_step)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        probs = self(batch["image"]).softmax(dim=-1)
        return {"probs": probs, "pred": probs.argmax(dim=-1)}
