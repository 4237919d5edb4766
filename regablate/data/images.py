"""A few fixed images to look at a model with: an image folder, or synthetic scenes with their masks.

``regablate inspect`` and the report's attention maps use these; training and probes go through
the data modules instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from regablate.data.synthetic import SyntheticScenesDataset
from regablate.errors import RegablateError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_image_folder(
    folder: Path, num_images: int, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """The first ``num_images`` images under ``folder`` (sorted paths), resized, centre-cropped, normalised."""
    if not folder.is_dir():
        raise RegablateError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:num_images]
    if not files:
        raise RegablateError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}; point --images at a folder of pictures"
        )
    transform = v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Resize(min(size), antialias=True),
            v2.CenterCrop(size),
            v2.Normalize(mean, std),
        ]
    )
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(transform(image.convert("RGB")))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise RegablateError(f"cannot read image {file}: {err}") from None
    return torch.stack(images)


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
