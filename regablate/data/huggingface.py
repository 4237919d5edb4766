"""Hugging Face ``datasets`` as a DataModule: a Hub name, a saved dataset, or a local folder of data files."""

from __future__ import annotations

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
from regablate.data.dense import PadToSquare, as_target, clean_depth
from regablate.data.sources import Source, load_splits
from regablate.errors import RegablateError
from regablate.hparams import make_hyperparameters_plain

BoxFormat = Literal["xyxy", "xywh"]
EvalResize = Literal["crop", "pad"]
# Names of the validation split, tried in this order when ``val_split`` is one of them.
VAL_NAMES = ("validation", "val")


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


def find_split(available: list[str], wanted: str | None) -> str | None:
    """``wanted`` if present; for a validation split named ``validation`` or ``val``, the other name too."""
    if wanted is None:
        return None
    candidates = VAL_NAMES if wanted in VAL_NAMES else (wanted,)
    return next((name for name in candidates if name in available), None)


def _rgb(image: Any) -> Image.Image:
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    return image if image.mode == "RGB" else image.convert("RGB")


class BatchTransform:
    """Turn a batch of dataset rows into the batch keys ``image``, ``label`` and any of ``mask``, ``depth``, ``box``.

    ``columns`` maps each batch key to its dataset column. Masks, depth maps and boxes go
    through the image's transform with it as ``tv_tensors`` (one random draw for all: the
    same crop and flip; masks and depth resized nearest-neighbour, padding filled with the
    ignore value and invalid depth), then only the image is scaled and normalised. Depth is
    stored value x ``depth_scale``, with non-finite, non-positive and beyond-``max_depth``
    pixels set to 0 (invalid: never trained on, never scored). A class rather than a closure,
    so DataLoader workers can pickle it.
    """

    def __init__(
        self,
        columns: dict[str, str],
        transform: Callable[..., Any],
        depth_scale: float = 1.0,
        box_format: BoxFormat = "xyxy",
        max_depth: float | None = None,
    ) -> None:
        self.columns = columns
        self.transform = transform
        self.depth_scale = depth_scale
        self.box_format = box_format
        self.max_depth = max_depth

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
        width, height = sample["image"].size
        if "label" in row:
            sample["label"] = row["label"]
        if "mask" in row:
            sample["mask"] = as_target(self._plane(row, "mask", (height, width)), "mask")
        if "depth" in row:
            depth = clean_depth(self._plane(row, "depth", (height, width)), self.depth_scale, self.max_depth)
            sample["depth"] = as_target(depth, "depth")
        if "box" in row:
            box = torch.as_tensor(row["box"], dtype=torch.float32).reshape(-1)
            if box.numel() != 4:
                raise RegablateError(
                    f"box column '{self.columns['box']}' holds {box.numel()} numbers per row; it needs one box of 4"
                )
            sample["box"] = tv_tensors.BoundingBoxes(
                box[None], format=self.box_format.upper(), canvas_size=(height, width)
            )
        return sample

    def _plane(self, row: dict[str, Any], key: str, size: tuple[int, int]) -> np.ndarray:
        """A mask or depth map (PIL image of any mode, nested list or array) as a 2-D array of the image's size."""
        array = np.asarray(row[key])
        column = self.columns[key]
        if array.ndim != 2:
            raise RegablateError(
                f"column '{column}' holds arrays of shape {array.shape}; masks and depth maps must be 2-D (H, W)"
            )
        if array.shape != size:
            raise RegablateError(
                f"column '{column}' holds a {array.shape[0]}x{array.shape[1]} map for a {size[0]}x{size[1]} image; "
                "masks and depth maps must have their image's size"
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

    Splits: ``val_split`` ``validation`` or ``val`` finds either name; without a validation
    split, ``val_fraction`` of train is held out (seeded) if it is set, and it is an error if
    not. A missing test split (or ``test_split=None``) leaves no ``test`` split:
    ``has_split("test")`` says so, and the validation data never stand in for it.

    Args:
        path: A Hub dataset name (e.g. ``ILSVRC/imagenet-1k``, parquet or webdataset), a folder
            written by ``save_to_disk`` (``scripts/prepare_*.py`` write those), or a folder of
            data files ``datasets`` reads: parquet, webdataset shards (``.tar``), images in one
            sub-folder per class (or ``train/``, ``validation/``, ``test/`` folders of those).
        name: Hub dataset configuration name, if it has several.
        data_dir: ``data_dir`` passed to ``load_dataset`` (a sub-folder of the data files).
        source: How to read ``path``: ``auto`` picks ``disk`` for a saved dataset folder,
            ``folder`` for another folder (format inferred by ``datasets``) and ``hub``
            otherwise; ``imagefolder`` forces images in class sub-folders.
        image_column: Column holding the images (``jpg`` in webdataset shards).
        label_column: Column holding the integer class labels (``cls`` in webdataset shards; ``None``: no labels).
        mask_column: Column of segmentation masks (2-D images, e.g. mode L PNGs, or arrays of class ids).
        depth_column: Column of depth maps (2-D images, e.g. float32 or 16-bit PNGs, or arrays),
            multiplied by ``depth_scale``.
        box_column: Column of one box per image (4 numbers, in ``box_format``).
        num_seg_classes: Class ids in the masks, 0..N-1 (ADE20k: 151 ids, 0 = "other"); an
            ignore value outside that range (255) is not counted. ``None``: probes count them.
        ignore_index: Mask value of unlabelled pixels (VOC: 255, ADE20k: 0): padding gets it.
            Give the probe the same (``--probe.ignore_index``).
        depth_scale: Factor from stored depth values to metres (16-bit PNGs in mm: 0.001).
        max_depth: Depth beyond this (in metres, after ``depth_scale``) is invalid, like
            non-finite and non-positive depth: set to 0, never trained on or scored (NYUd: 10).
        box_format: ``xyxy`` (corners) or ``xywh`` (COCO) pixels of the stored boxes.
        train_split: Split to train on.
        val_split: Split to validate on (``validation`` and ``val`` find each other); ``None``:
            hold out ``val_fraction`` of train.
        test_split: Split to test on; ``None`` or absent: no test split.
        val_fraction: Share of train held out when there is no validation split; ``None``: none
            (a missing validation split is then an error).
        eval_resize: Evaluation geometry: ``crop`` resizes the short side to 1.14 x img_size and
            takes the centre (ImageNet's protocol); ``pad`` resizes the long side to img_size and
            pads to a square (every pixel of a dense target is scored, padding is not).
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
        ignore_index: int = 255,
        depth_scale: PositiveFloat = 1.0,
        max_depth: PositiveFloat | None = None,
        box_format: BoxFormat = "xyxy",
        train_split: str = "train",
        val_split: str | None = "validation",
        test_split: str | None = "test",
        val_fraction: OpenUnitInterval | None = None,
        eval_resize: EvalResize = "crop",
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
        require(
            val_fraction is None or 0.0 < val_fraction < 1.0,
            f"val_fraction must be between 0 and 1, got {val_fraction}",
        )
        require(max_depth is None or max_depth > 0, f"max_depth must be positive, got {max_depth}")
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

        splits = load_splits(path, name, data_dir, source)
        available = list(splits)
        require(
            train_split in splits,
            f"split '{train_split}' not found in {path}; splits: {', '.join(available)} (set train_split)",
        )
        train = splits[train_split]
        for column in self.columns.values():
            require(
                column in train.column_names,
                f"column '{column}' not found in {path}; columns: {', '.join(train.column_names)} "
                "(set image_column / label_column / mask_column / depth_column / box_column)",
            )
        self.num_classes = self._count_classes(train, label_column) if label_column is not None else None

        val_name = find_split(available, val_split)
        if val_name is not None:
            val = splits[val_name]
        elif val_fraction is not None:
            rank_zero_info(f"{path}: no validation split, holding out {val_fraction:.0%} of '{train_split}'")
            train, val = _hold_out(train, val_fraction, seed)
        else:
            wanted = f"no split '{val_split}'" if val_split is not None else "val_split is null"
            raise RegablateError(
                f"{path}: {wanted} (splits: {', '.join(available)}); set val_split to one of them, "
                "or val_fraction to hold out a share of train"
            )
        self.splits = {"train": train, "val": val}
        test_name = find_split(available, test_split)
        if test_name is not None:
            self.splits["test"] = splits[test_name]

    def has_split(self, split: str) -> bool:
        return split in self.splits

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
        elif self.hparams.eval_resize == "pad":
            geometry = [v2.Resize(None, max_size=size, antialias=True), PadToSquare(size, self.hparams.ignore_index)]
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
        require(split in self.splits, f"this dataset has no {split} split (splits: {', '.join(self.splits)})")
        augment = split == "train" if augment is None else augment
        hp = self.hparams
        transform = BatchTransform(
            self.columns, self._transform(train=augment), hp.depth_scale, hp.box_format, hp.max_depth
        )
        return self.splits[split].with_transform(transform, columns=list(self.columns.values()))
