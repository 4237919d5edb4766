"""Synthetic scenes: determinism, label/mask/depth/box consistency, flips, the DataModule."""

import colorsys

import pytest
import torch
from torch.utils.data import DistributedSampler, SequentialSampler

from regablate.data import SyntheticScenes, SyntheticScenesDataset, render_scene
from regablate.data.common import IMAGENET_MEAN, IMAGENET_STD
from regablate.errors import RegablateError

K = 10


def tight_box(region: torch.Tensor) -> list[float]:
    rows, cols = region.any(dim=1).nonzero(), region.any(dim=0).nonzero()
    return [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]


def hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


def test_same_seed_split_index_gives_identical_samples_across_instances():
    a = SyntheticScenesDataset(seed=7, split="train", size=20, hflip=True)
    b = SyntheticScenesDataset(seed=7, split="train", size=20, hflip=True)
    for index in (0, 5, 19):
        x, y = a[index], b[index]
        assert x.keys() == y.keys() == {"image", "label", "mask", "depth", "box"}
        assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("other", [(0, "val", 3), (0, "train", 4), (1, "train", 3)], ids=["split", "index", "seed"])
def test_different_split_index_or_seed_gives_a_different_image(other):
    assert not torch.equal(render_scene(0, "train", 3)["image"], render_scene(*other)["image"])


@pytest.mark.parametrize("img_size", [8, 32, 64])
def test_label_mask_depth_box_describe_the_visible_scene(img_size):
    hue_jitter = 0.03
    for index in range(150):
        s = render_scene(11, "train", index, img_size=img_size, num_classes=K, hue_jitter=hue_jitter)
        image, label, mask, depth, box = s["image"], s["label"], s["mask"], s["depth"], s["box"]
        assert image.shape == (3, img_size, img_size) and image.dtype == torch.float32
        assert mask.shape == depth.shape == (img_size, img_size)
        assert (mask.dtype, depth.dtype, label.dtype, box.dtype) == (
            torch.int64,
            torch.float32,
            torch.int64,
            torch.float32,
        )
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert mask.min() >= 0 and mask.max() <= K and 0 <= label < K

        areas = torch.bincount(mask.flatten(), minlength=K + 1)[1:]
        assert 1 <= (areas > 0).sum() <= 3
        assert areas[label] == areas.max() > 0
        assert box.tolist() == tight_box(mask == label + 1)

        background = mask == 0
        if background.any():
            assert depth[~background].max() < depth[background].min()
        for c in mask.unique()[1:].tolist():
            pixels = mask == c
            assert depth[pixels].unique().numel() == 1, "one depth per object"
            # Every visible pixel of class c has class c's colour: occlusion is consistent.
            r, g, b = image[:, pixels].mean(dim=1).tolist()
            assert hue_distance(colorsys.rgb_to_hsv(r, g, b)[0], (c - 1) / K) <= hue_jitter + 1e-3


def test_largest_object_is_never_a_close_call():
    for index in range(300):
        mask = render_scene(2, "val", index)["mask"]
        areas = torch.bincount(mask.flatten(), minlength=K + 1)[1:].sort(descending=True).values
        assert areas[0] >= 1.5 * areas[1]


def test_background_depth_grows_towards_the_top():
    s = render_scene(0, "test", 0, img_size=32, max_objects=1)
    bg = torch.where(s["mask"] == 0, s["depth"], torch.nan)
    rows = bg.nanmean(dim=1)
    assert (rows[:-1] > rows[1:]).all()


def test_max_objects_one_gives_one_object():
    for index in range(30):
        assert render_scene(0, "train", index, max_objects=1)["mask"].unique().numel() == 2


def test_dataset_normalises_with_mean_and_std():
    raw = render_scene(0, "val", 4)["image"]
    image = SyntheticScenesDataset(split="val", size=5)[4]["image"]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(image * std + mean, raw)


def test_hflip_mirrors_image_mask_depth_and_box_together():
    plain = SyntheticScenesDataset(split="train", size=60, hflip=False)
    flipped = SyntheticScenesDataset(split="train", size=60, hflip=True)
    n_flipped = 0
    for index in range(60):
        a, b = plain[index], flipped[index]
        if torch.equal(a["image"], b["image"]):
            assert all(torch.equal(a[k], b[k]) for k in a)
            continue
        n_flipped += 1
        for key in ("image", "mask", "depth"):
            assert torch.equal(b[key], a[key].flip(-1))
        assert torch.equal(b["label"], a["label"])
        assert b["box"].tolist() == tight_box(b["mask"] == b["label"] + 1)
    assert 15 <= n_flipped <= 45


def test_datamodule_batches_have_the_documented_shapes():
    dm = SyntheticScenes(img_size=16, num_classes=5, train_size=12, val_size=6, test_size=5, batch_size=4)
    assert (dm.num_classes, dm.num_seg_classes, dm.img_size) == (5, 6, 16)
    assert (dm.mean, dm.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert dm.hparams.train_size == 12
    loaders = {
        "train": dm.train_dataloader(),
        "val": dm.val_dataloader(),
        "test": dm.test_dataloader(),
        "predict": dm.predict_dataloader(),
    }
    # One device shuffles with the one-replica DistributedSampler that DDP would deal out.
    train_sampler = loaders["train"].sampler
    assert isinstance(train_sampler, DistributedSampler) and train_sampler.shuffle and train_sampler.num_replicas == 1
    assert all(isinstance(loaders[s].sampler, SequentialSampler) for s in ("val", "test", "predict"))
    assert [len(loaders[s].dataset) for s in loaders] == [12, 6, 5, 5]
    for loader in loaders.values():
        batch = next(iter(loader))
        assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
        assert batch["label"].shape == (4,) and batch["label"].dtype == torch.int64
        assert batch["mask"].shape == (4, 16, 16) and batch["mask"].dtype == torch.int64
        assert batch["depth"].shape == (4, 16, 16) and batch["depth"].dtype == torch.float32
        assert batch["box"].shape == (4, 4) and batch["box"].dtype == torch.float32
        assert batch["mask"].max() <= 5 and batch["label"].max() < 5
    assert not torch.equal(dm.dataset("train")[0]["image"], dm.dataset("val")[0]["image"])


def test_workers_render_the_same_samples_as_the_main_process():
    def first_batch(num_workers):
        dm = SyntheticScenes(img_size=16, val_size=8, batch_size=4, num_workers=num_workers)
        return next(iter(dm.val_dataloader()))

    a, b = first_batch(0), first_batch(2)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"img_size": 4}, "img_size"),
        ({"num_classes": 1}, "num_classes"),
        ({"max_objects": 0}, "max_objects"),
        ({"train_size": 0}, "train_size"),
        ({"val_size": -1}, "val_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"seed": -1}, "seed"),
        ({"hue_jitter": 0.7}, "hue_jitter"),
        ({"min_objects": 4, "max_objects": 3}, "min_objects"),
        ({"label": "colour"}, "label"),
        ({"label": "count", "num_classes": 4, "max_objects": 6}, "max_objects <= num_classes"),
        ({"object_size": (0.1, 0.05)}, "object_size"),
        ({"object_size": (0.1, 0.4)}, "object_size"),
    ],
)
def test_bad_arguments_raise_a_user_error(kwargs, match):
    with pytest.raises(RegablateError, match=match):
        SyntheticScenes(**kwargs)


@pytest.mark.parametrize("index", range(12))
def test_scattered_scenes_count_every_object_exactly(index):
    scene = render_scene(
        3,
        "train",
        index,
        img_size=32,
        num_classes=16,
        min_objects=2,
        max_objects=6,
        object_size=(0.06, 0.1),
        label="count",
    )
    classes = scene["mask"].unique()
    classes = classes[classes > 0]
    # No overlap: every object drawn is visible, so the mask's classes are the objects.
    assert 1 <= len(classes) <= 6
    assert scene["label"].item() == len(classes) - 2
    for c in classes:  # objects are apart: each one's pixels form one compact blob within its radius bound
        rows, cols = (scene["mask"] == c).nonzero(as_tuple=True)
        assert rows.max() - rows.min() <= 2 * 1.25 * 0.1 * 32 + 1
        assert cols.max() - cols.min() <= 2 * 1.25 * 0.1 * 32 + 1


def test_scattered_scenes_leave_more_background_than_the_default_layout():
    default = torch.stack([render_scene(0, "val", i)["mask"] for i in range(64)])
    scattered = torch.stack(
        [render_scene(0, "val", i, object_size=(0.06, 0.1), max_objects=6)["mask"] for i in range(64)]
    )
    assert (scattered == 0).float().mean() > (default == 0).float().mean() + 0.05


def test_largest_label_and_default_layout_are_the_defaults():
    for index in range(5):
        a = render_scene(1, "train", index)
        b = render_scene(1, "train", index, min_objects=1, object_size=None, label="largest")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_count_label_datamodule_has_one_class_per_object_count():
    dm = SyntheticScenes(
        num_classes=16,
        min_objects=1,
        max_objects=6,
        object_size=(0.06, 0.1),
        label="count",
        train_size=64,
        val_size=64,
        test_size=8,
        batch_size=64,
    )
    assert dm.num_classes == 6 and dm.num_seg_classes == 17
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["label"].min() >= 0 and batch["label"].max() <= 5
    assert len(batch["label"].unique()) >= 4  # counts vary
    # the box is the largest object's: inside the image and non-empty
    assert (batch["box"][:, 2] > batch["box"][:, 0]).all() and (batch["box"][:, 3] > batch["box"][:, 1]).all()


def test_count_label_trains_a_classifier_with_its_own_num_classes(tmp_path):
    # The data's num_classes (object classes, 16) and the model's (counts, 6) differ: Lightning's
    # hparams merge must not see two num_classes of different values.
    from lightning import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    from regablate.tasks import Classification

    dm = SyntheticScenes(
        num_classes=16,
        max_objects=6,
        object_size=(0.07, 0.12),
        label="count",
        train_size=8,
        val_size=4,
        test_size=4,
        batch_size=4,
    )
    model = Classification(
        model_name="vit_tiny_patch16_224",
        num_registers=1,
        num_classes=6,
        img_size=32,
        model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
        warmup_steps=0,
    )
    trainer = Trainer(
        max_steps=1,
        logger=TensorBoardLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, dm)
    assert trainer.global_step == 1
    assert dm.hparams["num_object_classes"] == 16 and "num_classes" not in dm.hparams
