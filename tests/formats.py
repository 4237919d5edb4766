"""Tiny files in the real formats of the paper's datasets, written by the tests themselves (no download).

- ADE20k: ``ADEChallengeData2016.zip`` with ``images/{training,validation}/*.jpg`` and mode L
  ``annotations/.../*.png`` (0 = other, 1..150).
- NYU Depth v2: ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3 = HDF5 behind a 512-byte header,
  MATLAB's column-major layout) with ``splits.mat`` (MATLAB v5, 1-based indices); and the
  BTS / toolbox layout: ``scene/rgb_N.jpg``, ``scene/sync_depth_N.png`` (16-bit, mm) and split files.
- ImageNet: parquet files with a ``ClassLabel`` (``ILSVRC/imagenet-1k``'s layout), and
  webdataset shards with ``jpg``/``cls``/``json`` members (``timm/imagenet-1k-wds``).
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ADE_ROOT = "ADEChallengeData2016"


def image_bytes(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def ade_annotation(height: int, width: int, seed: int) -> np.ndarray:
    """A mode-L-ready class map: left half 'other' (0), right half classes from 1..150."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, width // 2 :] = rng.integers(1, 151)
    mask[: height // 3, width // 2 :] = 150
    return mask


def write_ade_zip(path: Path, sizes: dict[str, int] | None = None, shape: tuple[int, int] = (24, 32)) -> Path:
    """ADEChallengeData2016.zip with ``sizes`` images per archive folder (training, validation)."""
    sizes = sizes or {"training": 3, "validation": 2}
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            f"{ADE_ROOT}/objectInfo150.txt", "Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n"
        )
        for folder, count in sizes.items():
            prefix = "train" if folder == "training" else "val"
            for i in range(count):
                stem = f"ADE_{prefix}_{i + 1:08d}"
                image = rng.integers(0, 255, (*shape, 3), dtype=np.uint8)
                archive.writestr(f"{ADE_ROOT}/images/{folder}/{stem}.jpg", image_bytes(image, "JPEG"))
                annotation = ade_annotation(*shape, seed=i)
                archive.writestr(f"{ADE_ROOT}/annotations/{folder}/{stem}.png", image_bytes(annotation, "PNG"))
    return path


MATLAB_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."


def nyu_frames(count: int, shape: tuple[int, int] = (480, 640)) -> tuple[np.ndarray, np.ndarray]:
    """RGB frames (N, H, W, 3) uint8 and depth (N, H, W) float32 metres, with some missing (0) and NaN pixels."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (count, *shape, 3), dtype=np.uint8)
    depths = rng.uniform(0.5, 9.5, (count, *shape)).astype(np.float32)
    depths[:, :4, :] = 0.0  # Kinect holes
    depths[:, -1, :2] = np.nan
    return images, depths


def write_nyu_labeled(folder: Path, count: int = 5, train: tuple[int, ...] = (1, 3, 4), shape=(480, 640)):
    """``nyu_depth_v2_labeled.mat`` (HDF5, MATLAB layout) and ``splits.mat`` (v5); returns paths and frames."""
    import h5py
    from scipy.io import savemat

    images, depths = nyu_frames(count, shape)
    labeled = folder / "nyu_depth_v2_labeled.mat"
    with h5py.File(labeled, "w", userblock_size=512) as mat:
        # MATLAB stores column-major: (H, W, 3, N) reads back in HDF5 as (N, 3, W, H).
        mat.create_dataset("images", data=images.transpose(0, 3, 2, 1))
        mat.create_dataset("depths", data=depths.transpose(0, 2, 1))
        mat.create_dataset("labels", data=np.zeros((count, shape[1], shape[0]), dtype=np.uint16))
    with open(labeled, "r+b") as handle:
        handle.write(MATLAB_HEADER.ljust(116) + b"\x00" * 8 + b"\x00\x02IM")
    test = tuple(i for i in range(1, count + 1) if i not in train)
    splits = folder / "splits.mat"
    savemat(splits, {"trainNdxs": np.array(train, dtype=np.float64)[:, None], "testNdxs": np.array(test)[:, None]})
    return labeled, splits, images, depths


def write_nyu_lists(root: Path, scenes: dict[str, int], shape=(480, 640)) -> dict[str, list[tuple[str, str]]]:
    """The BTS / toolbox layout under ``root``: jpg frames, 16-bit mm depth PNGs; returns each scene's pairs."""
    images, depths = nyu_frames(sum(scenes.values()), shape)
    pairs: dict[str, list[tuple[str, str]]] = {}
    index = 0
    for scene, count in scenes.items():
        (root / scene).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rgb, depth = f"/{scene}/rgb_{i:05d}.jpg", f"/{scene}/sync_depth_{i:05d}.png"
            Image.fromarray(images[index]).save(root / rgb.lstrip("/"), quality=95)
            millimetres = np.nan_to_num(depths[index] * 1000).astype(np.uint16)
            Image.fromarray(millimetres).save(root / depth.lstrip("/"))
            pairs.setdefault(scene, []).append((rgb, depth))
            index += 1
    return pairs


def write_split_file(path: Path, pairs: list[tuple[str, str]], extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(f"{rgb} {depth} 518.8579\n" for rgb, depth in pairs) + "".join(extra_lines))
    return path


def write_imagenet_parquet(folder: Path, names=("tench", "goldfish", "shark", "hen"), rows=(6, 3)) -> Path:
    """``data/train-*.parquet`` and ``data/validation-*.parquet`` with ``image`` and a ``label`` ClassLabel."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    (folder / "data").mkdir(parents=True)
    rng = np.random.default_rng(2)
    for split, count in zip(("train", "validation"), rows):
        table = {
            "image": [Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)) for _ in range(count)],
            "label": [i % 3 for i in range(count)],  # label 3 never occurs: num_classes comes from the ClassLabel
        }
        datasets.Dataset.from_dict(table, features=features).to_parquet(
            str(folder / "data" / f"{split}-00000-of-00001.parquet")
        )
    return folder


def write_imagenet_wds(folder: Path, shards: dict[str, int] | None = None) -> Path:
    """``imagenet1k-{train,validation}-NNNN.tar`` shards: per sample ``KEY.jpg``, ``KEY.cls``, ``KEY.json``."""
    shards = shards or {"train": 5, "validation": 2}
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for split, count in shards.items():
        with tarfile.open(folder / f"imagenet1k-{split}-0000.tar", "w") as tar:
            for i in range(count):
                key = f"n0144{i:04d}_{split}_{i}"
                members = {
                    "jpg": image_bytes(rng.integers(0, 255, (18, 22, 3), dtype=np.uint8), "JPEG"),
                    "cls": str(i % 4).encode(),
                    "json": json.dumps({"filename": f"{key}.JPEG", "label": i % 4}).encode(),
                }
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder
