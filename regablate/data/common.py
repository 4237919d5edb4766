"""Pieces the data modules share: normalisation defaults, argument checks, split loaders."""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import TYPE_CHECKING, Any, cast

import lightning as L
from torch.utils.data import DataLoader, Dataset

from regablate.data.resume import train_sampler
from regablate.errors import RegablateError
from regablate.hparams import Hyperparameters

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


def num_samples(dataset: Dataset[Any]) -> int:
    """``len(dataset)``: torch types ``Dataset`` without ``__len__``, but every dataset here has one."""
    return len(cast(Sized, dataset))


class SplitDataModule(L.LightningDataModule):
    """Loaders over ``self.dataset(split)`` for splits train/val/test (predict uses test).

    Subclasses define ``dataset`` (and ``has_split`` when a split can be missing) and save
    ``batch_size`` and ``num_workers`` as hparams.

    The training order is the same on any number of devices, and a run restored part-way
    through an epoch goes on where it stopped: the training loader's sampler is
    ``data.resume.train_sampler``, the ``DistributedSampler(seed=PL_GLOBAL_SEED)`` that Lightning
    would insert, dealing one permutation out to the ranks.
    """

    if TYPE_CHECKING:  # Lightning types hparams as a MutableMapping; we read it by attribute

        @property
        def hparams(self) -> Hyperparameters: ...

    def dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def has_split(self, split: str) -> bool:
        """Whether ``split`` (train, val or test) exists; data modules without a test split answer False for it."""
        return True

    def _loader(self, split: str) -> DataLoader:
        workers = self.hparams.num_workers
        dataset = self.dataset(split)
        sampler = train_sampler(dataset, self.hparams.batch_size, self.trainer) if split == "train" else None
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            shuffle=False,
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
