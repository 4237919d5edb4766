"""Synthetic scenes: the embedded default data, rendered on the fly, no download.

Each sample is drawn deterministically from ``(seed, split, index)``: a large smooth,
low-saturation background (the redundant area where ViT artifacts like to live) and
1..``max_objects`` objects. Class ``c`` of ``K`` has a fixed shape, hue (``c / K``) and
texture, so a tiny ViT can learn it from local cues as well as from shape. Objects get a
random position, size, small rotation and depth, and are painted far to near, so nearer
objects occlude farther ones. Label, mask, depth and box describe what is visible.
"""

from __future__ import annotations

import colorsys
import math
import zlib
from collections.abc import Callable
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils.data import Dataset

from regablate.data.common import IMAGENET_MEAN, IMAGENET_STD, SplitDataModule, check_loader_args, require
from regablate.hparams import HueJitter, make_hyperparameters_plain

# Shape tests on rotated coordinates (u, v) in units of the object's radius. Every shape
# fits in a disc of radius _REACH, which bounds the window each object is drawn in.
_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.85,
    "triangle": lambda u, v: (v <= 0.5) & (np.abs(u) * math.sqrt(3.0) <= v + 1.0),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.0,
    "ring": lambda u, v: np.abs(u * u + v * v - 0.6) <= 0.4,
    "cross": lambda u, v: (np.minimum(np.abs(u), np.abs(v)) <= 0.33) & (np.maximum(np.abs(u), np.abs(v)) <= 1.0),
    "ellipse": lambda u, v: u * u + (v / 0.6) ** 2 <= 1.0,
    "star": lambda u, v: (
        np.sqrt(u * u + v * v) <= 0.45 + 1.1 * np.abs((np.arctan2(v, u) * (2.5 / math.pi)) % 1.0 - 0.5)
    ),
}
SHAPES = tuple(_SHAPES)
TEXTURES = ("solid", "stripes", "checker", "dots")
_REACH = 1.25  # the square's corner: 0.85 * sqrt(2)
_DARK = 0.5  # brightness of the dark parts of a texture
_GAP = 1.3  # scattered layout: centres at least this many summed radii apart
_PLACEMENT_TRIES = 50  # scattered layout: random positions tried per object before giving up on it
Label = Literal["largest", "count"]
LABELS = ("largest", "count")


def class_identity(c: int, num_classes: int) -> tuple[str, str, float]:
    """The fixed (shape, texture, hue) of class ``c``; shapes and textures cycle."""
    return SHAPES[c % len(SHAPES)], TEXTURES[(c + c // len(SHAPES)) % len(TEXTURES)], c / num_classes


def _texture(name: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray | float:
    """Brightness factor (1 or _DARK) of a texture at pixel offsets (u, v) along the object's axes."""
    if name == "solid":
        return 1.0
    if name == "stripes":
        dark = np.floor(u * (2.0 / period)) % 2.0
    elif name == "checker":
        dark = (np.floor(u * (2.0 / period)) + np.floor(v * (2.0 / period))) % 2.0
    else:  # dots
        du, dv = u % period - period / 2, v % period - period / 2
        dark = (du * du + dv * dv <= (0.3 * period) ** 2).astype(np.float64)
    return 1.0 - (1.0 - _DARK) * dark


@lru_cache(maxsize=16)
def _pixel_centres(size: int) -> np.ndarray:
    return np.arange(size, dtype=np.float32) + 0.5


def _rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    # A stable hash of the split name (never Python's salted hash()) keeps samples identical
    # across processes, workers and machines.
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index, stream])


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def render_scene(
    seed: int,
    split: str,
    index: int,
    *,
    img_size: int = 32,
    num_classes: int = 10,
    max_objects: int = 3,
    hue_jitter: float = 0.03,
    min_objects: int = 1,
    object_size: tuple[float, float] | None = None,
    label: Label = "largest",
) -> dict[str, torch.Tensor]:
    """Render one scene, deterministically from ``(seed, split, index)`` (all ints >= 0).

    ``min_objects``..``max_objects`` objects (at most ``num_classes``); ``object_size``: ``None``
    for the default layout, or ``(lo, hi)`` fractions of the side for the scattered one, where a
    scene may hold fewer objects than drawn when no free place is found (never fewer than one).

    Returns a dict of tensors:
      ``image`` float32 (3, H, W) in [0, 1], not normalised;
      ``label`` int64 scalar: class of the object with the most visible pixels (``"largest"``),
      or the number of objects minus ``min_objects`` (``"count"``);
      ``mask`` int64 (H, W): 0 background, ``c + 1`` for a visible pixel of class ``c``;
      ``depth`` float32 (H, W): background a ground plane 6-12 units away, farther towards the
      top; each object a constant depth in [1, 5] (brighter when nearer), always nearer;
      ``box`` float32 (4,): x1, y1, x2, y2 in pixels (x2, y2 exclusive), the tight box of
      the labelled object's visible pixels (those of class ``label`` in ``mask``).

    The first object is 25-60% of the image side across and every other object at most
    half its size, and objects have distinct classes, so the labelled class always covers
    the most pixels in ``mask``, by a clear margin (at least 1.5x the next, in tests).
    """
    scene = _render(seed, split, index, img_size, num_classes, max_objects, hue_jitter, min_objects, object_size, label)
    return {key: torch.from_numpy(value) for key, value in scene.items()}


def background(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, size: int) -> np.ndarray:
    """A scene's background (3, H, W): a two-colour gradient of low saturation plus a low-frequency ripple."""
    hue, sat, val = rng.random(3), rng.uniform(0.0, 0.25, 2), rng.uniform(0.25, 0.85, 2)
    near_colour, far_colour = (_rgb(hue[i], sat[i], val[i])[:, None, None] for i in range(2))
    angle, fx, fy, phase, ripple = rng.random(5).tolist()
    angle *= 2 * math.pi
    t = np.clip(((xs - size / 2) * math.cos(angle) + (ys - size / 2) * math.sin(angle)) / size + 0.5, 0.0, 1.0)
    wave = (0.03 + 0.05 * ripple) * np.sin(
        (2 * math.pi / size) * ((3 * fx - 1.5) * xs + (3 * fy - 1.5) * ys) + 2 * math.pi * phase
    )
    return near_colour + (far_colour - near_colour) * t + wave


def _render(
    seed: int,
    split: str,
    index: int,
    size: int,
    num_classes: int,
    max_objects: int,
    hue_jitter: float,
    min_objects: int = 1,
    object_size: tuple[float, float] | None = None,
    label: Label = "largest",
) -> dict[str, np.ndarray]:
    """``render_scene`` in numpy arrays (the dataset flips and normalises them before torch sees them)."""
    rng = _rng(seed, split, index)
    centres = _pixel_centres(size)
    xs, ys = centres[None, :], centres[:, None]
    image = background(rng, xs, ys, size)
    # Depth must be readable from the image, or no depth probe can beat the mean: the
    # background is a ground plane (depth grows with height in the image) and nearer objects
    # are brighter (their colour value falls from 1.0 at depth 1 to 0.6 at depth 5).
    background_depth = 6.0 + 6.0 * (1.0 - ys / size)

    # Objects: distinct classes; in the default layout index 0 is the main (largest) one.
    n = min(int(rng.integers(min_objects, max_objects + 1)), num_classes)
    classes = rng.permutation(num_classes)[:n]
    u = rng.random((n, 8))
    if object_size is None:
        radius = np.empty(n)
        radius[0] = max(2.0, (0.125 + 0.175 * u[0, 0]) * size)
        radius[1:] = radius[0] * (0.25 + 0.25 * u[1:, 0])
        cx = np.where(np.arange(n) == 0, radius[0] + (size - 2 * radius[0]) * u[:, 1], size * u[:, 1])
        cy = np.where(np.arange(n) == 0, radius[0] + (size - 2 * radius[0]) * u[:, 2], size * u[:, 2])
    else:
        radius, cx, cy = _scatter(rng, n, size, object_size)
        n = len(radius)
        classes, u = classes[:n], u[:n]
    rotation = 0.7 * (u[:, 3] - 0.5)  # +-20 degrees
    object_depth = 1.0 + 4.0 * u[:, 4]
    period = max(4.0, size / 8)

    ids = np.zeros((size, size), dtype=np.int64)  # 0 background, j + 1 for object j
    for j in np.argsort(-object_depth):  # far to near: nearer objects overwrite
        c = int(classes[j])
        shape, texture, class_hue = class_identity(c, num_classes)
        brightness = 1.0 - 0.1 * (object_depth[j] - 1.0)
        colour = _rgb(class_hue + hue_jitter * (2 * u[j, 5] - 1), 0.7 + 0.3 * u[j, 6], brightness)
        r, x, y, a = float(radius[j]), float(cx[j]), float(cy[j]), float(rotation[j])
        x0, x1 = max(0, int(x - _REACH * r)), min(size, math.ceil(x + _REACH * r))
        y0, y1 = max(0, int(y - _REACH * r)), min(size, math.ceil(y + _REACH * r))
        if x0 >= x1 or y0 >= y1:
            continue
        dx, dy = xs[:, x0:x1] - x, ys[y0:y1] - y
        along, across = math.cos(a) * dx + math.sin(a) * dy, math.cos(a) * dy - math.sin(a) * dx
        inside = _SHAPES[shape](along / r, across / r)
        paint = colour[:, None, None] * _texture(texture, along, across, period)
        window = image[:, y0:y1, x0:x1]
        window[...] = np.where(inside, paint, window)
        ids[y0:y1, x0:x1][inside] = j + 1

    visible = np.bincount(ids.ravel(), minlength=n + 1)[1:]
    main = int(np.argmax(visible))
    mask = np.concatenate(([0], classes + 1))[ids]
    depth = np.where(ids > 0, np.concatenate(([0.0], object_depth)).astype(np.float32)[ids], background_depth)
    rows = np.flatnonzero((ids == main + 1).any(axis=1))
    cols = np.flatnonzero((ids == main + 1).any(axis=0))
    box = [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]  # never empty: the main object has r >= 2 px
    target = classes[main] if label == "largest" else n - min_objects
    return {
        "image": np.clip(image, 0.0, 1.0),
        "label": np.array(target, dtype=np.int64),
        "mask": mask,
        "depth": depth.astype(np.float32, copy=False),
        "box": np.array(box, dtype=np.float32),
    }


def _scatter(
    rng: np.random.Generator, n: int, size: int, object_size: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Radii and centres of up to ``n`` objects that do not overlap (the first always fits)."""
    lo, hi = object_size
    placed: list[tuple[float, float, float]] = []
    for _ in range(n):
        for _ in range(_PLACEMENT_TRIES):
            r = max(1.0, size * rng.uniform(lo, hi))
            x, y = rng.uniform(r, size - r), rng.uniform(r, size - r)
            if all(math.hypot(x - a, y - b) > _GAP * (r + c) for a, b, c in placed):
                placed.append((x, y, r))
                break
    cx, cy, radius = (np.array(column, dtype=np.float64) for column in zip(*placed))
    return radius, cx, cy


class SyntheticScenesDataset(Dataset):
    """``size`` scenes of one split, rendered lazily; images normalised with mean/std.

    With ``hflip`` a fixed half of the samples (chosen by a coin seeded like the sample)
    is mirrored: image, mask, depth and box together.
    """

    def __init__(
        self,
        seed: int = 0,
        split: str = "train",
        size: int = 1000,
        img_size: int = 32,
        num_classes: int = 10,
        max_objects: int = 3,
        hue_jitter: float = 0.03,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        hflip: bool = False,
        min_objects: int = 1,
        object_size: tuple[float, float] | None = None,
        label: Label = "largest",
    ) -> None:
        self.seed, self.split, self.size, self.hflip = seed, split, size, hflip
        size_range = None if object_size is None else (float(object_size[0]), float(object_size[1]))
        self.scene = (img_size, num_classes, max_objects, hue_jitter, min_objects, size_range, label)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        # numpy until the end: per-sample torch ops pay for intra-op threading.
        sample = _render(self.seed, self.split, index, *self.scene)
        if self.hflip and _rng(self.seed, self.split, index, stream=1).random() < 0.5:
            for key in ("image", "mask", "depth"):
                sample[key] = np.ascontiguousarray(sample[key][..., ::-1])
            x1, y1, x2, y2 = sample["box"]
            width = sample["mask"].shape[-1]
            sample["box"] = np.array([width - x2, y1, width - x1, y2], dtype=np.float32)
        sample["image"] = (sample["image"] - self.mean) / self.std
        return {key: torch.from_numpy(value) for key, value in sample.items()}


class SyntheticScenes(SplitDataModule):
    """Synthetic scenes with labels, masks, depth and boxes: the default data, no download.

    Batches are dicts: ``image`` (B, 3, H, W) normalised, ``label`` (B,), ``mask``
    (B, H, W) with 0 for background and ``c + 1`` for class ``c``, ``depth`` (B, H, W) and
    ``box`` (B, 4) xyxy pixels of the labelled object. The same (seed, split, index) gives
    the same sample on every machine and worker; the splits are disjoint draws.

    Args:
        img_size: Image side in pixels (at least 8).
        num_classes: Number of object classes K (at least 2); masks have K + 1 values.
        max_objects: Most objects per scene (each scene has 1..max_objects).
        train_size: Number of training scenes.
        val_size: Number of validation scenes.
        test_size: Number of test scenes (also used for predict).
        seed: Base seed of all splits (0 or more).
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes (0 renders in the main process).
        hflip: Mirror a fixed, seeded half of the training scenes.
        hue_jitter: How far an object's hue strays from its class hue (0 to 0.5).
        min_objects: Fewest objects per scene (1 to max_objects).
        object_size: ``null`` for the default layout (a main object and smaller ones), or
            ``[lo, hi]``: every object's radius a uniform fraction of the side in that range,
            objects placed without overlap (more background, exact counts).
        label: ``largest`` (class of the largest object; ``num_classes`` labels) or ``count``
            (objects minus ``min_objects``; ``max_objects - min_objects + 1`` labels, which
            ``model.num_classes`` must then equal).
    """

    def __init__(
        self,
        img_size: PositiveInt = 32,
        num_classes: PositiveInt = 10,
        max_objects: PositiveInt = 3,
        train_size: PositiveInt = 10000,
        val_size: PositiveInt = 1000,
        test_size: PositiveInt = 1000,
        seed: NonNegativeInt = 0,
        batch_size: PositiveInt = 64,
        num_workers: NonNegativeInt = 0,
        hflip: bool = True,
        hue_jitter: HueJitter = 0.03,
        min_objects: PositiveInt = 1,
        object_size: tuple[float, float] | None = None,
        label: Label = "largest",
    ) -> None:
        super().__init__()
        check_loader_args(img_size, batch_size, num_workers, IMAGENET_MEAN, IMAGENET_STD)
        require(num_classes >= 2, f"num_classes must be at least 2, got {num_classes}")
        require(max_objects >= 1, f"max_objects must be at least 1, got {max_objects}")
        for name, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            require(value >= 1, f"{name} must be at least 1, got {value}")
        require(seed >= 0, f"seed must be 0 or more, got {seed}")
        require(0.0 <= hue_jitter <= 0.5, f"hue_jitter must be between 0 and 0.5, got {hue_jitter}")
        require(
            1 <= min_objects <= max_objects,
            f"min_objects must be between 1 and max_objects ({max_objects}), got {min_objects}",
        )
        require(label in LABELS, f"label must be one of {', '.join(LABELS)}, got {label!r}")
        if label == "count":
            require(
                max_objects <= num_classes,
                "label count needs max_objects <= num_classes (objects have distinct classes), "
                f"got {max_objects} > {num_classes}",
            )
        if object_size is not None:
            lo, hi = (float(v) for v in object_size)
            require(
                0.0 < lo <= hi <= 0.25,
                f"object_size must be [lo, hi] with 0 < lo <= hi <= 0.25 (radius / side), got {list(object_size)}",
            )
        # With count labels, num_classes (object classes) differs from the model's num_classes (counts);
        # Lightning refuses to log two hparams of one name with different values, so it is kept as
        # num_object_classes instead.
        self.save_hyperparameters(ignore=["num_classes"] if label == "count" else None)
        if label == "count":
            self.hparams["num_object_classes"] = num_classes
        make_hyperparameters_plain(self)
        self.img_size = int(img_size)
        self.num_object_classes = num_classes
        # The number of label values (what model.num_classes must equal); masks keep K + 1 values.
        self.num_classes = num_classes if label == "largest" else max_objects - min_objects + 1
        self.num_seg_classes = num_classes + 1
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    def dataset(self, split: str) -> SyntheticScenesDataset:
        """The dataset of ``split`` ("train", "val" or "test"); only train is flipped."""
        return self._scenes(split, self.mean, self.std, hflip=self.hparams.hflip and split == "train")

    def raw_dataset(self, split: str) -> SyntheticScenesDataset:
        """``split``'s scenes as rendered: images in [0, 1], not normalised, never flipped (DINOv2's own views)."""
        return self._scenes(split, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), hflip=False)

    def _scenes(
        self, split: str, mean: tuple[float, ...], std: tuple[float, ...], hflip: bool
    ) -> SyntheticScenesDataset:
        hp = self.hparams
        return SyntheticScenesDataset(
            seed=hp.seed,
            split=split,
            size=hp[f"{split}_size"],
            img_size=hp.img_size,
            num_classes=self.num_object_classes,
            max_objects=hp.max_objects,
            hue_jitter=hp.hue_jitter,
            mean=mean,
            std=std,
            hflip=hflip,
            min_objects=hp.min_objects,
            object_size=hp.object_size,
            label=hp.label,
        )
