"""Raw samples for DINOv2's protocols, and the loaders that turn them into views.

The protocols need images at other sizes than a data module's training transform gives
(random resized crops, resize 256 + crop 224, whole images for sliding windows, depth at the
ground truth's resolution), so they read each split *raw* and apply transforms of their own.
The interface is one function, :func:`raw_dataset`: ``split`` of a data module as a map-style
dataset of dicts with

* ``image``: float32 (3, H, W) in [0, 1], at the stored resolution, not normalised;
* any of ``label`` (int), ``mask`` (H, W) integer class ids, ``depth`` (H, W) float32 in the
  data's depth unit, 0 (or non-finite) where unknown; all at their stored resolution.

A data module provides it with a ``raw_dataset(split)`` method (``SyntheticScenes``: the rendered
scenes, unflipped and unnormalised); ``HFDataModule`` (its rows through the same column mapping,
``depth_scale`` and ``max_depth``, without geometry) is read here without one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from regablate.data.common import IMAGENET_MEAN, IMAGENET_STD, num_samples
from regablate.data.huggingface import BatchTransform, HFDataModule
from regablate.errors import RegablateError

RAW_KEYS = ("image", "label", "mask", "depth")
# Images to float tensors in [0, 1]; masks and depth maps (tv_tensors.Mask) pass through untouched.
_TO_TENSOR = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
# The class id of unlabelled pixels in training masks, and the padding values of the targets (unknown).
IGNORE = -1
PAD = {"mask": IGNORE, "depth": 0.0}


def raw_dataset(datamodule: LightningDataModule, split: str) -> Dataset:
    """``split`` ("train", "val" or "test") of ``datamodule`` as raw samples (see the module docstring)."""
    hook = getattr(datamodule, "raw_dataset", None)
    if callable(hook):
        return hook(split)
    if isinstance(datamodule, HFDataModule):
        columns = {key: column for key, column in datamodule.columns.items() if key in RAW_KEYS}
        hp = datamodule.hparams
        transform = BatchTransform(columns, _TO_TENSOR, hp.depth_scale, hp.box_format, hp.max_depth)
        return datamodule.splits[split].with_transform(transform, columns=list(columns.values()))
    raise RegablateError(
        f"the dinov2 protocol reads raw images, which {type(datamodule).__name__} does not give; use SyntheticScenes "
        "or HFDataModule, or give the data module a raw_dataset(split) method"
    )


def normalisation(datamodule: LightningDataModule) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The data module's image mean and std (ImageNet's, as DINOv2's, when it names none)."""
    return tuple(getattr(datamodule, "mean", IMAGENET_MEAN)), tuple(getattr(datamodule, "std", IMAGENET_STD))


class Views(Dataset):
    """``transform`` applied to each raw sample of ``raw`` (a fresh random draw at every access)."""

    def __init__(self, raw: Dataset, transform: Callable[[dict[str, Any]], dict[str, Tensor]]) -> None:
        self.raw, self.transform = raw, transform

    def __len__(self) -> int:
        return num_samples(self.raw)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.transform(self.raw[index])


class EndlessSampler(Sampler[int]):
    """Indices of ``size`` samples in a fresh seeded permutation per epoch, without end (dinov2's infinite sampler)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(self.size, generator=generator).tolist()


def training_batches(
    views: Dataset, batch_size: int, seed: int, num_workers: int, pin_memory: bool
) -> Iterator[dict[str, Tensor]]:
    """Endless batches of fresh views: each iteration draws new random crops and flips."""
    loader = DataLoader(
        views,
        batch_size=batch_size,
        sampler=EndlessSampler(num_samples(views), seed),
        num_workers=num_workers,
        collate_fn=pad_collate,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)


def pad_collate(samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack samples; images smaller than the largest are zero-padded bottom-right, masks and depth
    padded as unknown (the values in ``PAD``), as mmseg's ``Pad`` pads a crop smaller than its size."""
    batch = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if values[0].dim() >= 2:
            height = max(v.shape[-2] for v in values)
            width = max(v.shape[-1] for v in values)
            fill = PAD.get(key, 0)
            values = [
                torch.nn.functional.pad(v, (0, width - v.shape[-1], 0, height - v.shape[-2]), value=fill)
                for v in values
            ]
        batch[key] = torch.stack(values)
    return batch


def evaluation_batches(raw: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    """Raw samples of one split in order, ``batch_size`` at a time as lists (their sizes may differ)."""
    return DataLoader(raw, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=list)


def same_size_groups(images: list[Tensor]) -> list[list[int]]:
    """Indices of ``images`` grouped by (H, W), first-seen order: each group is one stacked forward."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault((image.shape[-2], image.shape[-1]), []).append(index)
    return list(groups.values())
