"""A few fixed images to look at a model with: an image folder (with object masks if the user has
them), or synthetic scenes with their masks.

``regablate inspect`` and the report's attention maps use these; training and probes go through
the data modules instead.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from regablate.data.synthetic import SyntheticScenesDataset
from regablate.errors import RegablateError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MASK_HELP = (
    "a folder with one PNG per image (same relative path and stem; 0 = background, any other value = object) "
    "or one .npz of boolean masks (one per image stem, or one (N, H, W) array in the images' sorted order)"
)


def image_files(folder: Path, num_images: int) -> list[Path]:
    """The first ``num_images`` image files under ``folder``, in sorted path order."""
    if not folder.is_dir():
        raise RegablateError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:num_images]
    if not files:
        raise RegablateError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}; point --images at a folder of pictures"
        )
    return files


def _geometry(size: tuple[int, int]) -> v2.Compose:
    """Resize the short side, then centre-crop: images bilinear (antialiased), masks nearest (torchvision's rule)."""
    return v2.Compose([v2.Resize(min(size), antialias=True), v2.CenterCrop(size)])


def load_image_folder(
    folder: Path, num_images: int, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """The first ``num_images`` images under ``folder`` (sorted paths), resized, centre-cropped, normalised."""
    return load_images(image_files(folder, num_images), size, mean, std)


def load_images(files: Sequence[Path], size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``files`` as one normalised ``(B, 3, *size)`` batch."""
    transform = v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), _geometry(size), v2.Normalize(mean, std)]
    )
    return torch.stack([transform(_open(file).convert("RGB")) for file in files])


def read_masks(source: Path, folder: Path, files: Sequence[Path]) -> list[np.ndarray]:
    """The object masks of the images ``files`` (found under ``folder``), at the images' sizes.

    0 = background, 1 = object. ``source`` is a folder of PNGs or one ``.npz`` (see ``MASK_HELP``);
    each mask must have its image's size. Cheap enough to run before a model is loaded, so a
    missing mask fails first.
    """
    if source.is_dir():
        masks = [_png_mask(source, folder, file) for file in files]
    elif source.is_file() and source.suffix == ".npz":
        masks = _npz_masks(source, folder, files)
    else:
        raise RegablateError(f"--masks {source} is neither a folder nor an .npz file; give {MASK_HELP}")
    for file, mask in zip(files, masks):
        with Image.open(file) as image:  # the header only
            width, height = image.size
        if mask.shape != (height, width):
            raise RegablateError(
                f"the mask of {file} is {mask.shape[1]}x{mask.shape[0]} pixels but the image is {width}x{height}; "
                "masks must have their image's size"
            )
    return masks


def fit_masks(masks: Sequence[np.ndarray], size: tuple[int, int]) -> Tensor:
    """Masks through the same resize and crop as their images (nearest neighbour): ``(B, *size)`` int64."""
    geometry = _geometry(size)
    return torch.stack(
        [geometry(tv_tensors.Mask(torch.from_numpy(mask.astype(np.int64)))).as_subclass(Tensor) for mask in masks]
    )


def _open(file: Path) -> Image.Image:
    try:
        image = Image.open(file)
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise RegablateError(f"cannot read image {file}: {err}") from None
    return image


def _png_mask(source: Path, folder: Path, file: Path) -> np.ndarray:
    relative = file.relative_to(folder).with_suffix(".png")
    candidates = [source / relative, source / relative.name]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise RegablateError(f"no mask for image {file}: expected {candidates[0]}; --masks takes {MASK_HELP}")
    image = _open(path)
    if image.mode in ("RGBA", "LA", "PA"):  # transparency is not an object
        image = image.convert("RGB" if image.mode == "RGBA" else "L")
    values = np.asarray(image)
    return np.asarray(values.any(axis=-1) if values.ndim == 3 else values != 0, dtype=np.uint8)


def _npz_masks(source: Path, folder: Path, files: Sequence[Path]) -> list[np.ndarray]:
    try:
        archive = np.load(source, allow_pickle=False)
        arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise RegablateError(f"cannot read masks {source}: {err}") from None
    keys = [file.relative_to(folder).with_suffix("").as_posix() for file in files]
    if len(arrays) == 1 and next(iter(arrays.values())).ndim == 3:  # one (N, H, W) stack in sorted order
        stack = next(iter(arrays.values()))
        if len(stack) < len(files):
            raise RegablateError(f"{source} holds {len(stack)} masks for {len(files)} images; give one per image")
        return [(m != 0).astype(np.uint8) for m in stack[: len(files)]]
    masks = []
    for file, key in zip(files, keys):
        found = arrays.get(key, arrays.get(Path(key).name))
        if found is None:
            raise RegablateError(f"{source} has no mask for image {file} (no key {key!r}); --masks takes {MASK_HELP}")
        if found.ndim != 2:
            raise RegablateError(f"the mask {key!r} in {source} has shape {found.shape}; a mask is one (H, W) array")
        masks.append((found != 0).astype(np.uint8))
    return masks


def synthetic_images(
    seed: int, num_images: int, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Synthetic validation scenes at the model's input size, with their segmentation masks."""
    if size[0] != size[1]:
        raise RegablateError(
            f"synthetic scenes are square but the model takes {size[0]}x{size[1]}; pass --img_size or --images"
        )
    scenes = SyntheticScenesDataset(
        seed=seed, split="val", size=num_images, img_size=size[0], mean=tuple(mean), std=tuple(std)
    )
    samples = [scenes[i] for i in range(num_images)]
    return torch.stack([s["image"] for s in samples]), torch.stack([s["mask"] for s in samples])
