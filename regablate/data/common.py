"""Pieces the data modules share: normalisation defaults, argument checks, split loaders."""

from __future__ import annotations

import os
from collections.abc import Sequence

import lightning as L
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from regablate.errors import RegablateError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def require(ok: bool, message: str) -> None:
    """Raise a one-line user-facing error unless ``ok``."""
    if not ok:
        raise RegablateError(message)


def check_loader_args(
    img_size: int, batch_size: int, num_workers: int, mean: Sequence[float], std: Sequence[float]
) -> None:
    require(img_size >= 8, f"img_size must be at least 8, got {img_size}")
    require(batch_size >= 1, f"batch_size must be at least 1, got {batch_size}")
    require(num_workers >= 0, f"num_workers must be 0 or more, got {num_workers}")
    require(len(mean) == 3 and len(std) == 3, "mean and std need 3 values (R, G, B)")
    require(all(s > 0 for s in std), f"std values must be positive, got {tuple(std)}")


class SplitDataModule(L.LightningDataModule):
    """Loaders over ``self.dataset(split)`` for splits train/val/test (predict uses test).

    Subclasses define ``dataset`` (and ``has_split`` when a split can be missing) and save
    ``batch_size`` and ``num_workers`` as hparams.

    The training order is the same on any number of devices: under DDP, Lightning shuffles
    with ``DistributedSampler(seed=PL_GLOBAL_SEED)`` and deals the permutation out to the
    ranks; on one device the loader takes the same sampler with one replica, so N devices
    see, step by step, the global batches that one device sees.
    """

    def dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def has_split(self, split: str) -> bool:
        """Whether ``split`` (train, val or test) exists; data modules without a test split answer False for it."""
        return True

    def _loader(self, split: str) -> DataLoader:
        workers = self.hparams.num_workers
        dataset = self.dataset(split)
        sampler = None
        distributed = self.trainer is not None and self.trainer.world_size > 1
        if split == "train" and not distributed:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            shuffle=split == "train" and sampler is None,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
