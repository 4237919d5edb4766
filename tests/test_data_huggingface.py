"""HFDataModule on local data: image folders and saved datasets, offline, caches in tmp_path."""

import datasets
import pytest
import torch
from PIL import Image

from regablate.data import HFDataModule
from regablate.data.common import IMAGENET_MEAN, IMAGENET_STD
from regablate.errors import RegablateError

COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "fox": (0, 0, 255)}


# Every test here reads local data with the network off and caches in tmp_path.
pytestmark = pytest.mark.usefixtures("offline_hf")


MODES = ("RGB", "RGBA", "L")


def write_image_folder(root, per_class=4, sizes=((20, 16), (12, 30))):
    """PNG files in one sub-folder per class, of several sizes and modes."""
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = Image.new("RGB", sizes[i % len(sizes)], colour).convert(MODES[i % len(MODES)])
            image.save(root / name / f"{i}.png")
    return root


def rgb_colours(name):
    """The colours images of class ``name`` have once converted to RGB, one per mode."""
    pixels = [Image.new("RGB", (1, 1), COLOURS[name]).convert(m).convert("RGB").getpixel((0, 0)) for m in MODES]
    return torch.tensor(pixels, dtype=torch.float32) / 255


def rows(n, image_size=(10, 10)):
    """Columns named unlike the batch keys: ``img``, ``fine_label`` (plain ints) and ``id``."""
    return {
        "img": [Image.new("RGB", image_size, (20 * i, 0, 0)) for i in range(n)],
        "fine_label": [i % 5 for i in range(n)],
        "id": list(range(n)),
    }


def denormalise(image):
    return image * torch.tensor(IMAGENET_STD).view(-1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(-1, 3, 1, 1)


def test_image_folder_loads_with_classes_and_carved_validation(tmp_path):
    folder = write_image_folder(tmp_path / "pets")
    dm = HFDataModule(str(folder), img_size=16, batch_size=3, val_fraction=0.25)
    assert (dm.num_classes, dm.img_size, dm.mean, dm.std) == (3, 16, IMAGENET_MEAN, IMAGENET_STD)
    assert (len(dm.splits["train"]), len(dm.splits["val"])) == (9, 3)
    assert dm.has_split("train") and dm.has_split("val") and not dm.has_split("test")
    with pytest.raises(RegablateError, match="no test split"):
        dm.test_dataloader()
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batch = next(iter(loader))
        assert batch.keys() == {"image", "label"}
        assert batch["image"].shape == (3, 3, 16, 16) and batch["image"].dtype == torch.float32
        assert batch["label"].shape == (3,) and batch["label"].dtype == torch.int64


def test_eval_images_are_rgb_and_normalised(tmp_path):
    folder = write_image_folder(tmp_path / "pets")
    dm = HFDataModule(str(folder), img_size=8, batch_size=12, val_fraction=0.5)
    names = dm.splits["val"].features["label"].names
    batch = next(iter(dm.val_dataloader()))
    for image, label in zip(denormalise(batch["image"]), batch["label"]):
        distances = (rgb_colours(names[label]) - image.mean(dim=(1, 2))).abs().amax(dim=1)
        assert distances.min() < 1e-3
        assert image.std(dim=(1, 2)).max() < 1e-3  # one flat colour, resized and cropped


def test_image_folder_with_split_folders_uses_them(tmp_path):
    write_image_folder(tmp_path / "data" / "train", per_class=3)
    write_image_folder(tmp_path / "data" / "validation", per_class=2)
    dm = HFDataModule(str(tmp_path / "data"), img_size=16)
    assert dm.num_classes == 3
    assert (len(dm.splits["train"]), len(dm.splits["val"])) == (9, 6)
    assert not dm.has_split("test"), "the validation data must not stand in for a missing test split"


def test_saved_dataset_dict_maps_columns_and_keeps_its_splits(tmp_path):
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict(rows(10)),
        validation=datasets.Dataset.from_dict(rows(4)),
        test=datasets.Dataset.from_dict(rows(3)),
    ).save_to_disk(str(saved))
    before = sorted(p.relative_to(saved) for p in saved.rglob("*"))
    dm = HFDataModule(str(saved), image_column="img", label_column="fine_label", img_size=8, batch_size=2)
    assert dm.num_classes == 5  # plain ints: max label + 1
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [10, 4, 3]
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (2, 3, 8, 8) and batch["label"].tolist() == [0, 1]
    next(iter(dm.train_dataloader()))
    assert sorted(p.relative_to(saved) for p in saved.rglob("*")) == before, "wrote into the data folder"


def test_saved_single_dataset_is_train_and_validation_is_a_seeded_hold_out(tmp_path):
    features = datasets.Features(
        {"img": datasets.Image(), "fine_label": datasets.ClassLabel(num_classes=7), "id": datasets.Value("int64")}
    )
    datasets.Dataset.from_dict(rows(20), features=features).save_to_disk(str(tmp_path / "one"))

    def ids(seed):
        dm = HFDataModule(
            str(tmp_path / "one"), image_column="img", label_column="fine_label", val_fraction=0.2, seed=seed
        )
        assert dm.num_classes == 7  # from the ClassLabel, not the labels seen
        return set(dm.splits["train"]["id"]), set(dm.splits["val"]["id"])

    train, val = ids(0)
    assert len(val) == 4 and not train & val and train | val == set(range(20))
    assert ids(0) == (train, val) and ids(1) != (train, val)


def test_missing_column_names_it_and_the_columns_there_are(tmp_path):
    datasets.Dataset.from_dict(rows(4)).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(RegablateError, match=r"column 'image' not found .*columns: img, fine_label, id"):
        HFDataModule(str(tmp_path / "saved"), label_column="fine_label")
    with pytest.raises(RegablateError, match="column 'label' not found"):
        HFDataModule(str(tmp_path / "saved"), image_column="img")


@pytest.mark.parametrize("path", ["./no/such/folder", "/no/such/folder", "~/no-such-folder", "a/b/c"])
def test_missing_local_folder_is_a_user_error(path):
    with pytest.raises(RegablateError, match="data folder not found"):
        HFDataModule(path)


def test_forced_local_source_needs_the_folder(tmp_path):
    with pytest.raises(RegablateError, match="data folder not found"):
        HFDataModule(str(tmp_path / "missing"), source="imagefolder")


def test_empty_image_folder_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegablateError, match="no data files found"):
        HFDataModule(str(tmp_path / "empty"))


def test_unreachable_hub_dataset_is_a_user_error():
    with pytest.raises(
        RegablateError, match="cannot reach the Hugging Face Hub for someone/no-such-dataset and it is not in the cache"
    ):
        HFDataModule("someone/no-such-dataset")


def test_missing_train_split_and_bad_arguments_are_user_errors(tmp_path):
    folder = write_image_folder(tmp_path / "pets", per_class=2)
    with pytest.raises(RegablateError, match="split 'training' not found .*splits: train"):
        HFDataModule(str(folder), train_split="training")
    with pytest.raises(RegablateError, match="val_fraction"):
        HFDataModule(str(folder), val_fraction=1.0)
    with pytest.raises(RegablateError, match="img_size"):
        HFDataModule(str(folder), img_size=2)


def save_splits(tmp_path, **sizes):
    path = tmp_path / "splits"
    datasets.DatasetDict({split: datasets.Dataset.from_dict(rows(n)) for split, n in sizes.items()}).save_to_disk(
        str(path)
    )
    return str(path)


COLUMNS = {"image_column": "img", "label_column": "fine_label"}


@pytest.mark.parametrize("name", ["val", "validation"])
def test_a_validation_split_named_val_or_validation_is_found(tmp_path, name):
    path = save_splits(tmp_path, train=6, **{name: 3})
    for wanted in ("validation", "val"):
        dm = HFDataModule(path, val_split=wanted, **COLUMNS)
        assert len(dm.splits["val"]) == 3 and len(dm.splits["train"]) == 6


def test_a_missing_validation_split_is_an_error_unless_a_hold_out_is_asked_for(tmp_path):
    path = save_splits(tmp_path, train=10, test=4)
    with pytest.raises(
        RegablateError, match=r"no split 'validation' \(splits: train, test\); set val_split .*val_fraction"
    ):
        HFDataModule(path, **COLUMNS)
    with pytest.raises(RegablateError, match="val_split is null"):
        HFDataModule(path, val_split=None, **COLUMNS)
    dm = HFDataModule(path, val_fraction=0.2, **COLUMNS)
    assert (len(dm.splits["train"]), len(dm.splits["val"]), len(dm.splits["test"])) == (8, 2, 4)
    held_out = sorted([*dm.splits["train"]["id"], *dm.splits["val"]["id"]])
    assert held_out == list(range(10)), "the hold-out comes from train, never from test"


def test_no_test_split_means_no_test_data(tmp_path):
    path = save_splits(tmp_path, train=6, validation=3, test=2)
    assert HFDataModule(path, **COLUMNS).has_split("test")
    dm = HFDataModule(path, test_split=None, **COLUMNS)
    assert not dm.has_split("test") and dm.has_split("val") and set(dm.splits) == {"train", "val"}
    with pytest.raises(RegablateError, match=r"no test split \(splits: train, val\)"):
        dm.dataset("test")


@pytest.mark.parametrize(
    "name, script", [("scene_parse_150", "prepare_ade20k.py"), ("sayakpaul/nyu_depth_v2", "prepare_nyud.py")]
)
def test_a_known_script_based_hub_dataset_names_its_preparation_script(name, script):
    with pytest.raises(RegablateError, match=rf"{name} is a script-based Hub dataset.*scripts/{script}"):
        HFDataModule(name)


def test_hub_errors_become_one_line(monkeypatch):
    def script_based(*args, **kwargs):
        raise RuntimeError("Dataset scripts are no longer supported, but found some_set.py")

    monkeypatch.setattr(datasets, "load_dataset", script_based)
    with pytest.raises(RegablateError, match="someone/some_set is a script-based Hub dataset.*parquet or webdataset"):
        HFDataModule("someone/some_set")

    def gated(*args, **kwargs):
        message = "Dataset 'ILSVRC/imagenet-1k' is a gated dataset on the Hub. You must be authenticated to access it."
        raise datasets.exceptions.DatasetNotFoundError(message)

    monkeypatch.setattr(datasets, "load_dataset", gated)
    with pytest.raises(RegablateError, match=r"ILSVRC/imagenet-1k is a gated dataset .*log in \(hf auth login"):
        HFDataModule("ILSVRC/imagenet-1k")
