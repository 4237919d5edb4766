"""Hugging Face ``datasets`` as a DataModule: a hub name, a local image folder, or a saved dataset."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import datasets
import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, OpenUnitInterval, PositiveFloat, PositiveInt
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from regablate.data.common import IMAGENET_MEAN, IMAGENET_STD, SplitDataModule, check_loader_args, require
from regablate.errors import RegablateError
from regablate.hparams import make_hyperparameters_plain

Source = Literal["auto", "hub", "imagefolder", "disk"]
BoxFormat = Literal["xyxy", "xywh"]


def _looks_local(path: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else with a separator is a file path.
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path


def _resolve_source(path: str, source: Source) -> Source:
    if source == "hub" or (source == "auto" and not os.path.exists(path) and not _looks_local(path)):
        return "hub"
    if not os.path.isdir(path):
        raise RegablateError(
            f"data folder not found: {path} (give an existing image folder or a folder written by "
            "Dataset.save_to_disk, or a Hugging Face Hub dataset name)"
        )
    if source == "auto":
        saved = any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))
        return "disk" if saved else "imagefolder"
    return source


def _load(path: str, name: str | None, data_dir: str | None, source: Source) -> datasets.DatasetDict:
    """Load all splits as a DatasetDict; a single saved Dataset becomes the only split, ``train``."""
    path = os.path.expanduser(path)
    source = _resolve_source(path, source)
    try:
        if source == "disk":
            loaded = datasets.load_from_disk(path)
        elif source == "imagefolder":
            loaded = datasets.load_dataset("imagefolder", data_dir=path)
        else:
            loaded = datasets.load_dataset(path, name, data_dir=data_dir)
    except datasets.data_files.EmptyDatasetError as e:
        raise RegablateError(f"no images found in {path} (put images in one sub-folder per class)") from e
    except (FileNotFoundError, ConnectionError) as e:
        hint = "check the name, the network and HF_HUB_OFFLINE" if source == "hub" else "check the folder"
        raise RegablateError(f"cannot load dataset {path} ({source}): {e} ({hint})") from e
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)


def _hold_out(train: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split off a seeded ``fraction`` of ``train`` (at least one row each side).

    Index mappings stay in memory, so no cache file lands in the user's data folder
    (``train_test_split(keep_in_memory=True)`` refuses datasets that have cache files).
    """
    n = len(train)
    require(n >= 2, f"cannot hold out validation data from a train split of {n} row(s); give a validation split")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * fraction)))
    return train.select(order[n_val:], keep_in_memory=True), train.select(order[:n_val], keep_in_memory=True)


def _rgb(image: Any) -> Image.Image:
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    return image if image.mode == "RGB" else image.convert("RGB")


class BatchTransform:
    """Turn a batch of dataset rows into the batch keys ``image``, ``label`` and any of ``mask``, ``depth``, ``box``.

    ``columns`` maps each batch key to its dataset column. Masks, depth maps and boxes go
    through the image's transform with it as ``tv_tensors`` (one random draw for all: the
    same crop and flip; masks and depth resized nearest-neighbour), then only the image is
    scaled and normalised. A class rather than a closure, so DataLoader workers can pickle it.
    """

    def __init__(
        self,
        columns: dict[str, str],
        transform: Callable[..., Any],
        depth_scale: float = 1.0,
        box_format: BoxFormat = "xyxy",
    ) -> None:
        self.columns = columns
        self.transform = transform
        self.depth_scale = depth_scale
        self.box_format = box_format

    def __call__(self, rows: dict[str, list]) -> dict[str, list]:
        keys = [key for key in ("image", "label", "mask", "depth", "box") if key in self.columns]
        out: dict[str, list] = {key: [] for key in keys}
        for values in zip(*(rows[self.columns[key]] for key in keys)):
            sample = self.transform(self._sample(dict(zip(keys, values))))
            for key in keys:
                out[key].append(sample[key])
        if "box" in out:
            out["box"] = [box.as_subclass(torch.Tensor).reshape(4) for box in out["box"]]
        for key in ("mask", "depth"):
            if key in out:
                out[key] = [value.as_subclass(torch.Tensor) for value in out[key]]
        return out

    def _sample(self, row: dict[str, Any]) -> dict[str, Any]:
        sample: dict[str, Any] = {"image": _rgb(row["image"])}
        if "label" in row:
            sample["label"] = row["label"]
        if "mask" in row:
            sample["mask"] = tv_tensors.Mask(
                torch.from_numpy(_plane(row["mask"], self.columns["mask"]).astype(np.int64))
            )
        if "depth" in row:
            depth = _plane(row["depth"], self.columns["depth"]).astype(np.float32) * self.depth_scale
            sample["depth"] = tv_tensors.Mask(torch.from_numpy(depth))
        if "box" in row:
            width, height = sample["image"].size
            box = torch.as_tensor(row["box"], dtype=torch.float32).reshape(-1)
            if box.numel() != 4:
                raise RegablateError(
                    f"box column '{self.columns['box']}' holds {box.numel()} numbers per row; it needs one box of 4"
                )
            sample["box"] = tv_tensors.BoundingBoxes(
                box[None], format=self.box_format.upper(), canvas_size=(height, width)
            )
        return sample


def _plane(value: Any, column: str) -> np.ndarray:
    """A mask or depth map (PIL image, nested list or array) as a 2-D array."""
    array = np.asarray(value)
    if array.ndim != 2:
        raise RegablateError(
            f"column '{column}' holds arrays of shape {array.shape}; masks and depth maps must be 2-D (H, W)"
        )
    return array


class HFDataModule(SplitDataModule):
    """Images with labels, and optionally masks, depth maps and boxes, from Hugging Face ``datasets``.

    Data are loaded (memory-mapped, cheap) at construction, so ``num_classes`` is known at
    once. Batches are dicts: ``image`` (B, 3, img_size, img_size) normalised, ``label`` (B,),
    and where their columns are mapped ``mask`` (B, img_size, img_size) int64 class ids,
    ``depth`` (B, img_size, img_size) float32 and ``box`` (B, 4) xyxy pixels, all cropped and
    flipped with the image (ADE20k-/VOC-style masks, NYUd-style depth, one box per image).
    ``label_column=None`` serves datasets without class labels (dense tasks only).
    Without a validation split, ``val_fraction`` of train is held out (seeded); without a
    test split, test uses the validation data.

    Args:
        path: A hub dataset name (e.g. ``ILSVRC/imagenet-1k``), a folder of images in one
            sub-folder per class (or ``train/``, ``validation/``, ``test/`` folders of those),
            or a folder written by ``save_to_disk``.
        name: Hub dataset configuration name, if it has several.
        data_dir: ``data_dir`` passed to ``load_dataset`` for hub datasets.
        source: How to read ``path``: ``auto`` picks ``disk`` for a saved dataset folder,
            ``imagefolder`` for another folder and ``hub`` otherwise.
        image_column: Column holding the images.
        label_column: Column holding the integer class labels (``None``: no labels).
        mask_column: Column of segmentation masks (2-D images or arrays of class ids).
        depth_column: Column of depth maps (2-D images or arrays), multiplied by ``depth_scale``.
        box_column: Column of one box per image (4 numbers, in ``box_format``).
        num_seg_classes: Classes in the masks, ignore value excluded (``None``: probes count them).
        depth_scale: Factor from stored depth values to the depth unit (NYUd PNGs in mm: 0.001).
        box_format: ``xyxy`` (corners) or ``xywh`` (COCO) pixels of the stored boxes.
        train_split: Split to train on.
        val_split: Split to validate on; ``None`` or absent: carve it from train.
        test_split: Split to test on; ``None`` or absent: use the validation data.
        val_fraction: Share of train held out when there is no validation split.
        img_size: Side of the square crops fed to the model.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        seed: Seed of the train/validation carve.
        mean: Per-channel normalisation mean (RGB, images in [0, 1]).
        std: Per-channel normalisation std.
        hflip: Random horizontal flips on training images.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        data_dir: str | None = None,
        source: Source = "auto",
        image_column: str = "image",
        label_column: str | None = "label",
        mask_column: str | None = None,
        depth_column: str | None = None,
        box_column: str | None = None,
        num_seg_classes: PositiveInt | None = None,
        depth_scale: PositiveFloat = 1.0,
        box_format: BoxFormat = "xyxy",
        train_split: str = "train",
        val_split: str | None = "validation",
        test_split: str | None = "test",
        val_fraction: OpenUnitInterval = 0.1,
        img_size: PositiveInt = 224,
        batch_size: PositiveInt = 64,
        num_workers: NonNegativeInt = 0,
        seed: NonNegativeInt = 0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        hflip: bool = True,
    ) -> None:
        super().__init__()
        check_loader_args(img_size, batch_size, num_workers, mean, std)
        require(0.0 < val_fraction < 1.0, f"val_fraction must be between 0 and 1, got {val_fraction}")
        self.save_hyperparameters()
        make_hyperparameters_plain(self)
        self.img_size, self.mean, self.std = int(img_size), tuple(mean), tuple(std)
        require(depth_scale > 0, f"depth_scale must be positive, got {depth_scale}")
        require(
            num_seg_classes is None or num_seg_classes >= 1,
            f"num_seg_classes must be at least 1, got {num_seg_classes}",
        )
        self.num_seg_classes = num_seg_classes
        mapped = {
            "image": image_column,
            "label": label_column,
            "mask": mask_column,
            "depth": depth_column,
            "box": box_column,
        }
        self.columns = {key: column for key, column in mapped.items() if column is not None}

        splits = _load(path, name, data_dir, source)
        require(
            train_split in splits,
            f"split '{train_split}' not found in {path}; splits: {', '.join(splits)} (set train_split)",
        )
        train = splits[train_split]
        for column in self.columns.values():
            require(
                column in train.column_names,
                f"column '{column}' not found in {path}; columns: {', '.join(train.column_names)} "
                "(set image_column / label_column / mask_column / depth_column / box_column)",
            )
        self.num_classes = self._count_classes(train, label_column) if label_column is not None else None

        if val_split in splits:
            val = splits[val_split]
        else:
            rank_zero_info(f"{path}: no split '{val_split}', holding out {val_fraction:.0%} of '{train_split}'")
            train, val = _hold_out(train, val_fraction, seed)
        self.splits = {"train": train, "val": val, "test": splits.get(test_split, val)}

    @staticmethod
    def _count_classes(train: datasets.Dataset, column: str) -> int:
        feature = train.features[column]
        if isinstance(feature, datasets.ClassLabel):
            return feature.num_classes
        require(
            isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")),
            f"label column '{column}' holds {feature}, not integer class labels",
        )
        return int(np.max(train.with_format("numpy")[column])) + 1

    def _transform(self, train: bool) -> v2.Compose:
        size = self.img_size
        if train:
            geometry = [v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True)]
            geometry += [v2.RandomHorizontalFlip()] if self.hparams.hflip else []
        else:
            geometry = [v2.Resize(int(size * 1.14), antialias=True), v2.CenterCrop(size)]
        boxes = [v2.ConvertBoundingBoxFormat("XYXY"), v2.ClampBoundingBoxes()] if "box" in self.columns else []
        return v2.Compose(
            [*geometry, *boxes, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        )

    def dataset(self, split: str, augment: bool | None = None) -> datasets.Dataset:
        """Split ``train``, ``val`` or ``test`` with its transform: rows are dicts of the mapped batch keys.

        ``augment`` (default: only for train) picks the random crop and flip over the
        deterministic resize and centre crop; frozen-feature probes extract with ``False``.
        """
        augment = split == "train" if augment is None else augment
        hp = self.hparams
        transform = BatchTransform(self.columns, self._transform(train=augment), hp.depth_scale, hp.box_format)
        return self.splits[split].with_transform(transform, columns=list(self.columns.values()))
