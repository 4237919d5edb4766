"""HFDataModule on the formats the paper's datasets use, written here in miniature (tests/formats.py).

ADE-style mode L annotation PNGs, depth as float32 metres (an Image of mode F, or the nested
lists ``datasets`` makes of a float array) and as 16-bit PNGs in millimetres, ImageNet as
parquet with a ClassLabel and as webdataset shards; masks and depth resized with nearest
neighbours and padded with the ignore value.
"""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from regablate.data import HFDataModule
from regablate.errors import RegablateError
from tests.formats import image_bytes, write_imagenet_parquet, write_imagenet_wds

pytestmark = pytest.mark.usefixtures("offline_hf")


def save(tmp_path, rows, features=None, splits=("train", "validation")):
    path = tmp_path / "saved"
    datasets.DatasetDict({split: datasets.Dataset.from_dict(rows, features=features) for split in splits}).save_to_disk(
        str(path)
    )
    return str(path)


def images(n, shape):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)) for _ in range(n)]


def eval_batch(dm, split="val"):
    return next(iter(dm.val_dataloader() if split == "val" else dm.test_dataloader()))


def test_ade_annotation_pngs_keep_their_class_ids_and_padding_is_ignored(tmp_path):
    # A 12x24 image, left half "other" (0), right half classes 7 and 150, as mode L PNG bytes.
    mask = np.zeros((12, 24), dtype=np.uint8)
    mask[:, 12:18], mask[:, 18:] = 7, 150
    rows = {
        "image": images(2, (12, 24)),
        "annotation": [{"bytes": image_bytes(mask, "PNG"), "path": f"{i}.png"} for i in range(2)],
    }
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    path = save(tmp_path, rows, features)
    args = {"mask_column": "annotation", "label_column": None, "img_size": 16, "batch_size": 2}
    padded = eval_batch(HFDataModule(path, ignore_index=0, eval_resize="pad", **args))["mask"]
    assert padded.shape == (2, 16, 16) and padded.dtype == torch.int64
    assert set(padded.unique().tolist()) == {0, 7, 150}  # nearest neighbours: no id in between
    assert (padded[:, :4] == 0).all() and (padded[:, 12:] == 0).all()  # 12x24 -> 8x16, padded by 4 rows each side
    assert (padded[:, 4:12, 8:12] == 7).all() and (padded[:, 4:12, 12:] == 150).all()
    voc = eval_batch(HFDataModule(path, ignore_index=255, eval_resize="pad", **args))["mask"]
    assert (voc[:, :4] == 255).all() and (voc[:, 4:12] != 255).all(), "padding takes the ignore value"
    train = next(iter(HFDataModule(path, **args).train_dataloader()))["mask"]
    assert set(train.unique().tolist()) <= {0, 7, 150}, "random crops resize masks with nearest neighbours"


def depth_rows(depth_column):
    rng = np.random.default_rng(1)
    depth = rng.uniform(0.5, 12.0, (8, 8)).astype(np.float32)
    depth[0, :4], depth[1, 0], depth[1, 1], depth[1, 2] = 0.0, np.nan, -1.0, np.inf
    return depth, {"image": images(2, (8, 8)), depth_column: [depth, depth]}


@pytest.mark.parametrize("stored", ["image_mode_f", "float_lists"])
def test_float32_depth_in_metres_loads_with_invalid_pixels_zeroed(tmp_path, stored):
    depth, rows = depth_rows("depth")
    features = None
    if stored == "image_mode_f":  # an Image column holding float32 arrays: datasets writes mode F TIFFs
        features = datasets.Features({"image": datasets.Image(), "depth": datasets.Image()})
    path = save(tmp_path, rows, features)
    if stored == "float_lists":
        assert isinstance(datasets.load_from_disk(path)["train"].features["depth"], datasets.List)
    dm = HFDataModule(path, depth_column="depth", label_column=None, max_depth=10.0, img_size=8, eval_resize="pad")
    got = eval_batch(dm)["depth"][0]
    assert got.dtype == torch.float32
    expected = np.where(np.isfinite(depth) & (depth > 0) & (depth <= 10.0), depth, 0.0)
    torch.testing.assert_close(got, torch.from_numpy(expected.astype(np.float32)))
    assert (got == 0).sum() == int((expected == 0).sum()) >= 7  # 4 zeros, NaN, -1, inf, and beyond 10 m


def test_16_bit_depth_pngs_in_millimetres_scale_to_metres(tmp_path):
    millimetres = np.array([[0, 500, 1234, 65535], [2000, 3000, 9999, 10001]] * 2, dtype=np.uint16)  # 0: no depth
    rows = {
        "image": images(2, (4, 4)),
        "depth": [{"bytes": image_bytes(millimetres, "PNG"), "path": "d.png"}] * 2,
    }
    path = save(tmp_path, rows, datasets.Features({"image": datasets.Image(), "depth": datasets.Image()}))
    assert datasets.load_from_disk(path)["train"][0]["depth"].mode in ("I;16", "I")  # decoded as 16-bit
    dm = HFDataModule(
        path, depth_column="depth", label_column=None, depth_scale=0.001, max_depth=10.0, img_size=8, eval_resize="pad"
    )
    got = eval_batch(dm)["depth"][0]
    expected = np.where(millimetres <= 10000, millimetres / 1000.0, 0.0).astype(np.float32)
    torch.testing.assert_close(got[::2, ::2], torch.from_numpy(expected))  # 4x4 -> 8x8 by nearest neighbours
    torch.testing.assert_close(got[1::2, 1::2], got[::2, ::2])


def test_mask_of_another_size_than_its_image_is_a_user_error(tmp_path):
    rows = {"image": images(1, (8, 8)), "seg": [np.zeros((4, 8), dtype=np.int64)]}
    dm = HFDataModule(save(tmp_path, rows), mask_column="seg", label_column=None, img_size=8)
    with pytest.raises(RegablateError, match=r"column 'seg' holds a 4x8 map for a 8x8 image"):
        eval_batch(dm)


def test_imagenet_parquet_with_a_class_label(tmp_path):
    folder = write_imagenet_parquet(tmp_path / "imagenet")
    dm = HFDataModule(str(folder), img_size=16, batch_size=3, test_split=None)
    assert dm.num_classes == 4, "num_classes comes from the ClassLabel, not the labels seen"
    assert {split: len(data) for split, data in dm.splits.items()} == {"train": 6, "val": 3}
    batch = eval_batch(dm)
    assert batch["image"].shape == (3, 3, 16, 16) and batch["label"].tolist() == [0, 1, 2]


def test_imagenet_webdataset_shards_with_jpg_and_cls(tmp_path):
    folder = write_imagenet_wds(tmp_path / "wds")
    dm = HFDataModule(str(folder), image_column="jpg", label_column="cls", img_size=16, batch_size=2)
    assert dm.num_classes == 4 and not dm.has_split("test")
    assert {split: len(data) for split, data in dm.splits.items()} == {"train": 5, "val": 2}
    assert eval_batch(dm)["label"].tolist() == [0, 1]
    with pytest.raises(RegablateError, match=r"column 'image' not found .*columns: jpg, cls, json"):
        HFDataModule(str(folder))


class PixelFeatures(torch.nn.Module):
    """One token per pixel (its RGB values): enough for a depth head to train on."""

    def forward(self, images):
        from regablate.probe.features import BatchFeatures

        patches = images.permute(0, 2, 3, 1)
        return BatchFeatures(cls=images.mean(dim=(2, 3)), patches=patches, keys=patches[..., :1])


def test_invalid_depth_pixels_are_counted_in_the_log_and_never_scored(tmp_path, caplog):
    import logging

    from regablate.probe.run import run_probe
    from regablate.probe.settings import FastSettings, LinearProbe

    depth, rows = depth_rows("depth")
    path = save(tmp_path, rows, splits=("train", "validation", "test"))
    dm = HFDataModule(path, depth_column="depth", label_column=None, max_depth=10.0, img_size=8, eval_resize="pad")
    invalid = int((dm.dataset("test", augment=False)[0]["depth"] == 0).sum()) * 2
    with caplog.at_level(logging.INFO, logger="regablate.probe.protocol"):
        report = run_probe(
            PixelFeatures(),
            dm,
            LinearProbe(fast=FastSettings(batch_size=2, depth_steps=3), probes=["depth"]),
            output_dir=tmp_path / "out",
            patch_size=(1, 1),
            data_config={"depth": 1},
            use_cache=False,
        )
    assert f"depth: {invalid} of 128 test pixels invalid" in caplog.text
    assert np.isfinite(report.metrics["probe/depth_rmse"])
