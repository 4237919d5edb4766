"""NYU Depth v2 from its official files, as a saved dataset with depth in millimetres (16-bit PNG).

Two sources, one output (splits ``train`` and ``test``, columns ``image`` and ``depth``; read it
with ``depth_column: depth``, ``depth_scale: 0.001``, ``max_depth: 10``):

- ``labeled``: ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3, i.e. HDF5: read with h5py) and the
  official ``splits.mat`` (``trainNdxs``/``testNdxs``, 1-based): the 1,449 labelled frames with
  their in-painted depth in metres, 795 train / 654 test.
- ``lists``: the split files of the BTS / Monocular-Depth-Estimation-Toolbox layout that DINOv2's
  depth evaluation follows (``nyu_train.txt``: 24,231 frames of the raw sequences;
  ``nyu_test.txt``: the 654 Eigen test frames; lines ``/scene/rgb_00045.jpg
  /scene/sync_depth_00045.png 518.8579``, depth PNGs in millimetres), under one data root.

The test split gets the Eigen crop (``eigen_crop``, on by default): depth outside rows 45:471 and
columns 41:601 of the 480x640 frame is set to 0, so it is never scored, as in the toolbox's
``eval_mask``. Depth 0 marks a pixel without ground truth; invalid pixels are counted per split.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
from PIL import Image

from regablate.data.prepare import SplitRows, write_prepared
from regablate.errors import RegablateError

FEATURES = datasets.Features({"image": datasets.Image(), "depth": datasets.Image()})
EIGEN_CROP = (slice(45, 471), slice(41, 601))  # rows, columns of the 480x640 frame that are scored
FRAME = (480, 640)
MM_PER_M = 1000.0


def _h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise RegablateError(
            "reading NYU's MATLAB v7.3 files needs h5py: pip install -e '.[prepare]' (or pip install h5py scipy)"
        ) from None
    return h5py


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def depth_png(depth_mm: np.ndarray, eigen_crop: bool) -> tuple[bytes, int]:
    """A 16-bit PNG of depth in mm (0 = no depth), the Eigen crop applied if asked; and its invalid-pixel count."""
    depth = np.where(np.isfinite(depth_mm) & (depth_mm > 0), depth_mm, 0.0)
    if eigen_crop:
        if depth.shape != FRAME:
            raise RegablateError(
                f"the Eigen crop needs NYU's 480x640 frames, got {depth.shape[0]}x{depth.shape[1]} (eigen_crop false)"
            )
        keep = np.zeros(depth.shape, dtype=bool)
        keep[EIGEN_CROP] = True
        depth = np.where(keep, depth, 0.0)
    depth = np.clip(np.round(depth), 0, np.iinfo(np.uint16).max).astype(np.uint16)
    return _png(depth), int((depth == 0).sum())


class _Counter:
    """Invalid depth pixels of a split, reported when the split is written."""

    def __init__(self, split: str) -> None:
        self.split, self.invalid, self.pixels = split, 0, 0

    def add(self, invalid: int, pixels: int) -> None:
        self.invalid += invalid
        self.pixels += pixels

    def line(self) -> str:
        share = self.invalid / self.pixels if self.pixels else 0.0
        return f"{self.split}: {share:.1%} of depth pixels without ground truth (0: never scored)"


def _labeled_rows(labeled: str, indices: list[int], eigen_crop: bool, split: str) -> Iterator[dict[str, Any]]:
    counter = _Counter(split)
    with _h5py().File(labeled, "r") as mat:
        images, depths = mat["images"], mat["depths"]  # MATLAB's column-major arrays: (N, 3, W, H), (N, W, H)
        for index in indices:
            image = np.ascontiguousarray(np.asarray(images[index]).transpose(2, 1, 0))
            depth, invalid = depth_png(np.asarray(depths[index], dtype=np.float64).T * MM_PER_M, eigen_crop)
            counter.add(invalid, image.shape[0] * image.shape[1])
            yield {
                "image": {"bytes": _png(image), "path": f"{index + 1:04d}.png"},
                "depth": {"bytes": depth, "path": f"{index + 1:04d}_depth.png"},
            }
    print(counter.line())


def _split_indices(splits: str) -> dict[str, list[int]]:
    """0-based frame indices of ``splits.mat`` (MATLAB v5 through scipy, or v7.3 through h5py)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise RegablateError(
            "reading splits.mat needs scipy: pip install -e '.[prepare]' (or pip install scipy)"
        ) from None
    try:
        mat = loadmat(splits)
        found = {"train": mat["trainNdxs"], "test": mat["testNdxs"]}
    except NotImplementedError:  # a v7.3 (HDF5) file
        with _h5py().File(splits, "r") as mat:
            found = {"train": np.asarray(mat["trainNdxs"]), "test": np.asarray(mat["testNdxs"])}
    except KeyError as err:
        raise RegablateError(f"{splits} has no {err} (the official splits.mat holds trainNdxs and testNdxs)") from None
    return {split: sorted(int(i) - 1 for i in np.ravel(values)) for split, values in found.items()}


def _check_labeled(labeled: str, indices: dict[str, list[int]]) -> None:
    try:
        with _h5py().File(labeled, "r") as mat:
            missing = [key for key in ("images", "depths") if key not in mat]
            if missing:
                raise RegablateError(f"{labeled} has no {', '.join(missing)}: is it nyu_depth_v2_labeled.mat?")
            frames = mat["images"].shape[0]
            if mat["depths"].shape[0] != frames:
                raise RegablateError(f"{labeled}: {frames} images but {mat['depths'].shape[0]} depth maps")
    except OSError as err:
        raise RegablateError(f"cannot read {labeled} as MATLAB v7.3 (HDF5): {err}") from None
    for split, chosen in indices.items():
        outside = [i + 1 for i in chosen if not 0 <= i < frames]
        if outside:
            raise RegablateError(f"splits: {split} frame {outside[0]} is not one of the {frames} labelled frames")


def _list_pairs(list_file: str, root: Path) -> list[tuple[str, str]]:
    """(image, depth) paths under ``root`` of a BTS / toolbox split file; lines without depth ('None') skipped."""
    pairs = []
    for number, line in enumerate(Path(list_file).read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise RegablateError(f"{list_file}:{number}: expected 'IMAGE DEPTH [FOCAL]', got {line!r}")
        if parts[1] == "None":
            continue
        pairs.append((str(root / parts[0].lstrip("/\\")), str(root / parts[1].lstrip("/\\"))))
    missing = [path for pair in pairs for path in pair if not os.path.isfile(path)]
    if missing:
        raise RegablateError(f"{len(missing)} file(s) of {list_file} are missing under {root}, e.g. {missing[0]}")
    if not pairs:
        raise RegablateError(f"{list_file} lists no image with depth")
    return pairs


def _list_rows(pairs: list[tuple[str, str]], eigen_crop: bool, split: str) -> Iterator[dict[str, Any]]:
    counter = _Counter(split)
    for image_path, depth_path in pairs:
        with Image.open(depth_path) as depth_image:
            if depth_image.mode not in ("I;16", "I;16B", "I"):
                raise RegablateError(f"{depth_path} is a mode {depth_image.mode} image, not a 16-bit depth PNG in mm")
            depth_mm = np.asarray(depth_image).astype(np.float64)
        depth, invalid = depth_png(depth_mm, eigen_crop)
        counter.add(invalid, depth_mm.size)
        yield {
            "image": {"bytes": Path(image_path).read_bytes(), "path": os.path.basename(image_path)},
            "depth": {"bytes": depth, "path": os.path.basename(depth_path)},
        }
    print(counter.line())


def prepare_nyud(
    source: Literal["labeled", "lists"],
    output: str = "data/nyud",
    labeled: str | None = None,
    splits: str | None = None,
    train_list: str | None = None,
    test_list: str | None = None,
    root: str | None = None,
    eigen_crop: bool = True,
) -> None:
    """Turn NYU Depth v2's official files into a saved dataset for regablate (splits train and test).

    Args:
        source: 'labeled': nyu_depth_v2_labeled.mat + splits.mat (795 / 654 frames); 'lists': the
            BTS / toolbox split files that DINOv2 uses (24,231 / 654 frames) over their data root.
        output: folder to write (save_to_disk): columns image and depth (16-bit PNG, mm; 0 = no depth).
        labeled: nyu_depth_v2_labeled.mat (source labeled).
        splits: the official splits.mat (source labeled).
        train_list: nyu_train.txt (source lists).
        test_list: nyu_test.txt (source lists).
        root: the folder the split files' paths are relative to (source lists).
        eigen_crop: score the test split only inside the Eigen crop (depth outside it set to 0).
    """
    if source == "labeled":
        if not labeled or not splits:
            raise RegablateError("source labeled needs --labeled nyu_depth_v2_labeled.mat and --splits splits.mat")
        for path in (labeled, splits):
            if not os.path.isfile(path):
                raise RegablateError(f"{path} not found (NYU Depth v2: https://cs.nyu.edu/~silberman/datasets/)")
        indices = _split_indices(splits)
        _check_labeled(labeled, indices)
        rows = {
            split: SplitRows(
                _labeled_rows,
                {"labeled": labeled, "indices": chosen, "eigen_crop": eigen_crop and split == "test", "split": split},
                len(chosen),
            )
            for split, chosen in indices.items()
        }
    else:
        if not train_list or not test_list or not root:
            raise RegablateError("source lists needs --train_list, --test_list and --root (the data folder)")
        pairs = {"train": _list_pairs(train_list, Path(root)), "test": _list_pairs(test_list, Path(root))}
        rows = {
            split: SplitRows(
                _list_rows, {"pairs": chosen, "eigen_crop": eigen_crop and split == "test", "split": split}, len(chosen)
            )
            for split, chosen in pairs.items()
        }
    written = write_prepared(output, FEATURES, rows)
    sizes = ", ".join(f"{split} {spec.total}" for split, spec in rows.items())
    print(f"NYU Depth v2: {sizes} frames -> {written} (depth_column: depth, depth_scale: 0.001, max_depth: 10)")
