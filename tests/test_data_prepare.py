"""scripts/prepare_ade20k.py and scripts/prepare_nyud.py on tiny archives in the official formats (tests/formats.py)."""

from __future__ import annotations

import io
import zipfile

import datasets
import numpy as np
import pytest
from PIL import Image

from regablate.data import HFDataModule
from regablate.data.ade20k import prepare_ade20k
from regablate.data.nyud import EIGEN_CROP, prepare_nyud
from regablate.errors import RegablateError
from tests.conftest import REPO
from tests.formats import ADE_ROOT, image_bytes, write_ade_zip, write_nyu_labeled, write_nyu_lists, write_split_file

pytestmark = pytest.mark.usefixtures("offline_hf")


def test_ade20k_zip_becomes_a_saved_dataset_with_the_files_unchanged(tmp_path, capsys):
    archive = write_ade_zip(tmp_path / "ADEChallengeData2016.zip", {"training": 3, "validation": 2})
    prepare_ade20k(str(archive), str(tmp_path / "ade20k"))
    assert "prepare: train: 3 images in " in capsys.readouterr().out  # Progress's closing line, per split
    saved = datasets.load_from_disk(str(tmp_path / "ade20k"))
    assert {split: len(data) for split, data in saved.items()} == {"train": 3, "validation": 2}
    first = saved["validation"].cast_column("annotation", datasets.Image(decode=False))[0]["annotation"]
    with zipfile.ZipFile(archive) as original:
        assert first["bytes"] == original.read(f"{ADE_ROOT}/annotations/validation/ADE_val_00000001.png")
    assert saved["train"][0]["annotation"].mode == "L"
    dm = HFDataModule(
        str(tmp_path / "ade20k"),
        mask_column="annotation",
        label_column=None,
        num_seg_classes=151,
        ignore_index=0,
        test_split=None,
        img_size=16,
        batch_size=2,
    )
    mask = next(iter(dm.val_dataloader()))["mask"]
    assert mask.shape == (2, 16, 16) and 0 in mask and mask.max() == 150
    assert not list(tmp_path.glob(".ade20k*")), "no staging folder or shards left behind"


def test_ade20k_from_the_extracted_folder(tmp_path):
    archive = write_ade_zip(tmp_path / "ADE.zip", {"training": 2, "validation": 1})
    with zipfile.ZipFile(archive) as original:
        original.extractall(tmp_path / "extracted")
    prepare_ade20k(str(tmp_path / "extracted"), str(tmp_path / "out"))
    assert datasets.load_from_disk(str(tmp_path / "out")).num_rows == {"train": 2, "validation": 1}


def test_bad_ade20k_archives_fail_in_one_line_and_write_nothing(tmp_path):
    with pytest.raises(RegablateError, match="download ADEChallengeData2016.zip"):
        prepare_ade20k(str(tmp_path / "missing.zip"), str(tmp_path / "out"))
    (tmp_path / "partial.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(RegablateError, match="not a zip archive"):
        prepare_ade20k(str(tmp_path / "partial.zip"), str(tmp_path / "out"))
    rgb = tmp_path / "rgb.zip"
    write_ade_zip(rgb, {"training": 2, "validation": 1})
    with zipfile.ZipFile(rgb, "a") as archive:  # the full ADE20K's RGB-coded masks are another dataset
        colour = np.zeros((24, 32, 3), dtype=np.uint8)
        archive.writestr(f"{ADE_ROOT}/images/validation/ADE_val_00000009.jpg", image_bytes(colour, "JPEG"))
        archive.writestr(f"{ADE_ROOT}/annotations/validation/ADE_val_00000009.png", image_bytes(colour, "PNG"))
    with pytest.raises(RegablateError, match="ADE_val_00000009.png is a mode RGB image"):
        prepare_ade20k(str(rgb), str(tmp_path / "out"))
    orphan = tmp_path / "orphan.zip"
    write_ade_zip(orphan, {"training": 2, "validation": 1})
    with zipfile.ZipFile(orphan, "a") as archive:
        archive.writestr(f"{ADE_ROOT}/images/training/ADE_train_00000077.jpg", image_bytes(colour, "JPEG"))
    with pytest.raises(RegablateError, match="ADE_train_00000077 has no annotation"):
        prepare_ade20k(str(orphan), str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orphan.zip", "partial.zip", "rgb.zip"]


def test_nyud_labeled_mat_with_the_official_splits(tmp_path):
    pytest.importorskip("h5py")
    pytest.importorskip("scipy")
    labeled, splits, images, depths = write_nyu_labeled(tmp_path, count=5, train=(1, 3, 4))
    prepare_nyud("labeled", output=str(tmp_path / "nyud"), labeled=str(labeled), splits=str(splits))
    saved = datasets.load_from_disk(str(tmp_path / "nyud"))
    assert saved.num_rows == {"train": 3, "test": 2}
    train, test = saved["train"], saved["test"]
    np.testing.assert_array_equal(np.asarray(train[1]["image"]), images[2])  # frame 3 (1-based), lossless PNG
    millimetres = np.asarray(train[0]["depth"]).astype(np.float64)
    assert train[0]["depth"].mode in ("I;16", "I")
    expected = np.nan_to_num(np.round(depths[0].astype(np.float64) * 1000))
    np.testing.assert_array_equal(millimetres, expected)  # train: no crop; holes and NaN stay 0
    cropped = np.asarray(test[0]["depth"]).astype(np.float64)  # frame 2, Eigen crop
    keep = np.zeros(cropped.shape, dtype=bool)
    keep[EIGEN_CROP] = True
    assert (cropped[~keep] == 0).all()
    np.testing.assert_array_equal(cropped[keep], np.nan_to_num(np.round(depths[1].astype(np.float64) * 1000))[keep])

    dm = HFDataModule(
        str(tmp_path / "nyud"),
        depth_column="depth",
        label_column=None,
        depth_scale=0.001,
        max_depth=10,
        val_split=None,
        val_fraction=0.34,
        eval_resize="pad",
        img_size=64,
        batch_size=2,
    )
    assert (len(dm.splits["train"]), len(dm.splits["val"]), len(dm.splits["test"])) == (2, 1, 2)
    depth = next(iter(dm.test_dataloader()))["depth"]
    assert depth.shape == (2, 64, 64) and depth[depth > 0].min() >= 0.5 and depth.max() <= 9.5
    assert (depth[:, :8] == 0).all(), "480x640 -> 48x64, padded with invalid depth above and below"


def test_nyud_split_lists_of_the_toolbox_layout(tmp_path):
    root = tmp_path / "nyu"
    pairs = write_nyu_lists(root, {"kitchen_0028b": 2, "bathroom": 1})
    train = write_split_file(
        tmp_path / "nyu_train.txt", pairs["kitchen_0028b"], ("/kitchen_0028b/rgb_09.jpg None 518\n",)
    )
    test = write_split_file(tmp_path / "nyu_test.txt", pairs["bathroom"])
    prepare_nyud("lists", output=str(tmp_path / "nyud"), train_list=str(train), test_list=str(test), root=str(root))
    saved = datasets.load_from_disk(str(tmp_path / "nyud"))
    assert saved.num_rows == {"train": 2, "test": 1}  # the 'None' line has no depth: skipped
    raw = saved["train"].cast_column("depth", datasets.Image(decode=False))[0]["depth"]["bytes"]
    original = np.asarray(Image.open(root / "kitchen_0028b" / "sync_depth_00000.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(raw))), original)
    assert (np.asarray(saved["test"][0]["depth"])[:45] == 0).all()  # Eigen crop on test
    with pytest.raises(RegablateError, match=r"1 file\(s\) of .*bad.txt are missing under .*bathroom/rgb_00005.jpg"):
        bad = write_split_file(tmp_path / "bad.txt", [("/bathroom/rgb_00005.jpg", "/bathroom/sync_depth_00000.png")])
        prepare_nyud("lists", output=str(tmp_path / "o"), train_list=str(train), test_list=str(bad), root=str(root))
    with pytest.raises(RegablateError, match="source labeled needs --labeled"):
        prepare_nyud("labeled", output=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_prepare_scripts_run_as_commands(tmp_path):
    import subprocess
    import sys

    archive = write_ade_zip(tmp_path / "ADEChallengeData2016.zip", {"training": 1, "validation": 1})
    script = str(REPO / "scripts" / "prepare_ade20k.py")
    done = subprocess.run(
        [sys.executable, script, str(archive), "--output", str(tmp_path / "ade")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ADE20k: train 1, validation 1 images" in done.stdout
    assert "prepare: validation: 1 images in" in done.stdout  # progress as lines when not on a terminal
    failed = subprocess.run([sys.executable, script, str(tmp_path / "none.zip")], capture_output=True, text=True)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1
    assert failed.stderr.startswith("prepare_ade20k: error: ") and "Traceback" not in failed.stderr
    nyud = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_nyud.py"), "raw"], capture_output=True, text=True
    )
    assert nyud.returncode == 2 and nyud.stderr.startswith("prepare_nyud: error: ") and "labeled" in nyud.stderr
