"""Probe features of a backbone whose registers are tampered with (``--register_intervention``, ``--test_registers``).

:class:`IntervenedExtractor` runs :class:`~regablate.probe.features.ViTExtractor` under
:func:`~regablate.models.interventions.intervened`. The intervention and the register statistics
are buffers of the extractor, so the feature store's weights fingerprint (and with it the store's
folder) differs from the plain model's: intervened features are never mixed up with plain ones.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import cast

import torch
from lightning import LightningDataModule
from torch import Tensor

from regablate.commands import INTERVENTION_KINDS
from regablate.models.interventions import Intervention, RegisterStatistics, intervened, register_statistics
from regablate.models.layout import Backbone
from regablate.probe.device import ProbeDevice
from regablate.probe.features import BatchFeatures, ViTExtractor
from regablate.probe.plan import frozen_dataset


def reference_size(datamodule: LightningDataModule) -> int:
    """How many training images the mean/noise statistics can be taken over."""
    return len(cast(Sized, frozen_dataset(datamodule, "train")))


class IntervenedExtractor(ViTExtractor):
    """A ViT extractor whose every pass runs with ``intervention`` (and, for mean/noise, ``statistics``)."""

    def __init__(
        self, model: Backbone, intervention: Intervention, statistics: RegisterStatistics | None = None
    ) -> None:
        super().__init__(model)
        intervention.check(model)
        self.intervention = intervention
        self.statistics = statistics
        kept = -1 if intervention.test_registers is None else intervention.test_registers
        code = [INTERVENTION_KINDS.index(intervention.kind), intervention.from_block, kept]
        self.register_buffer("intervention_key", torch.tensor(code))
        if statistics is not None:
            self.register_buffer("register_mean", statistics.mean)
            self.register_buffer("register_std", statistics.std)

    @torch.inference_mode()
    def forward(self, images: Tensor) -> BatchFeatures:
        statistics = self.statistics
        if statistics is not None:  # the buffers follow the extractor to its device
            statistics = RegisterStatistics(
                statistics.from_block, self.get_buffer("register_mean"), self.get_buffer("register_std")
            )
        with intervened(self.model, self.intervention, statistics):
            return super().forward(images)


def reference_statistics(
    model: Backbone,
    intervention: Intervention,
    datamodule: LightningDataModule,
    num_images: int,
    where: ProbeDevice,
    batch_size: int = 64,
) -> RegisterStatistics:
    """The registers' statistics on the first ``num_images`` training images, found on rank 0, on every rank."""
    statistics = None
    if where.is_main:
        dataset = frozen_dataset(datamodule, "train")
        count = min(num_images, len(cast(Sized, dataset)))
        batches = (
            torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, count))]).to(where.device)
            for start in range(0, count, batch_size)
        )
        statistics = register_statistics(model, batches, intervention)
    return where.broadcast(statistics)
