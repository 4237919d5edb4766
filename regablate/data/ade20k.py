"""ADE20k (the MIT Scene Parsing benchmark, 150 classes) from its official archive, as a saved dataset.

``ADEChallengeData2016.zip`` (http://sceneparsing.csail.mit.edu/) holds
``images/{training,validation}/*.jpg`` and ``annotations/{training,validation}/*.png``: mode L
PNGs of class ids, 0 = "other" (not scored) and 1..150 the classes. The prepared dataset keeps
both files byte for byte (no re-encoding) in splits ``train`` (20,210) and ``validation``
(2,000), columns ``image`` and ``annotation``; read it with ``mask_column: annotation``,
``num_seg_classes: 151``, ``ignore_index: 0`` (and ``--probe.ignore_index 0``): ids 1..150 are
scored, 0 is neither trained on nor scored, as in mmsegmentation's ``reduce_zero_label``.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from regablate.data.prepare import SplitRows, write_prepared
from regablate.errors import RegablateError

FEATURES = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
SPLITS = {"train": "training", "validation": "validation"}  # prepared split -> the archive's folder


class _Archive:
    """The files of the zip, or of the folder it was extracted to, by their path inside it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip = zipfile.ZipFile(path) if path.is_file() else None

    def names(self) -> list[str]:
        if self._zip is not None:
            return [info.filename for info in self._zip.infolist() if not info.is_dir()]
        return [str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file()]

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(name)
        return (self.path / name).read_bytes()


def _pairs(names: list[str], folder: str) -> list[tuple[str, str]]:
    """(image, annotation) names of one split, matched by file stem; an unmatched file is an error."""
    images = {Path(n).stem: n for n in names if f"images/{folder}/" in n and n.lower().endswith(".jpg")}
    annotations = {Path(n).stem: n for n in names if f"annotations/{folder}/" in n and n.lower().endswith(".png")}
    alone = sorted(set(images) ^ set(annotations))
    if alone:
        side = "annotation" if alone[0] in images else "image"
        raise RegablateError(
            f"{len(alone)} file(s) of images/{folder} and annotations/{folder} have no partner, e.g. {alone[0]} "
            f"has no {side}: is the archive complete?"
        )
    return [(images[stem], annotations[stem]) for stem in sorted(images)]


def _rows(archive: str, pairs: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
    source = _Archive(Path(archive))
    for image_name, annotation_name in pairs:
        image, annotation = source.read(image_name), source.read(annotation_name)
        with Image.open(io.BytesIO(image)) as im, Image.open(io.BytesIO(annotation)) as an:  # headers only
            if an.mode != "L":
                raise RegablateError(
                    f"{annotation_name} is a mode {an.mode} image; ADEChallengeData2016's annotations are mode L "
                    "class ids (the full ADE20K release, with RGB-coded *_seg.png files, is another dataset)"
                )
            if an.size != im.size:
                raise RegablateError(
                    f"{annotation_name} is {an.size[0]}x{an.size[1]}, its image {im.size[0]}x{im.size[1]}"
                )
        yield {
            "image": {"bytes": image, "path": os.path.basename(image_name)},
            "annotation": {"bytes": annotation, "path": os.path.basename(annotation_name)},
        }


def prepare_ade20k(archive: str, output: str = "data/ade20k") -> None:
    """Turn ADEChallengeData2016.zip (or its extracted folder) into a saved dataset for regablate.

    Args:
        archive: ADEChallengeData2016.zip, or the folder it was extracted to.
        output: folder to write (save_to_disk): splits train and validation, columns image and annotation.
    """
    path = Path(archive).expanduser()
    if not path.exists():
        raise RegablateError(
            f"{archive} not found: download ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu/"
        )
    try:
        names = _Archive(path).names()
    except zipfile.BadZipFile:
        raise RegablateError(f"{archive} is not a zip archive (a partial download?)") from None
    splits = {}
    for split, folder in SPLITS.items():
        pairs = _pairs(names, folder)
        if not pairs:
            raise RegablateError(f"{archive} has no images/{folder}/*.jpg: is it ADEChallengeData2016?")
        splits[split] = SplitRows(_rows, {"archive": str(path), "pairs": pairs}, len(pairs))
    written = write_prepared(output, FEATURES, splits)
    sizes = ", ".join(f"{split} {spec.total}" for split, spec in splits.items())
    print(f"ADE20k: {sizes} images -> {written} (mask_column: annotation, num_seg_classes: 151, ignore_index: 0)")
