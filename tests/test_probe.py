"""`regablate probe` end to end on synthetic scenes: trained vs random vs oracle, cache, bad input."""

import json
import logging
import shutil

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from regablate.cli import main
from regablate.data import HFDataModule, SyntheticScenes, SyntheticScenesDataset
from regablate.probe import BatchFeatures, FastSettings, LinearProbe, run_probe
from regablate.probe import run as probe_run
from tests.conftest import TRAINED_MODEL

SMALL_DATA = ["--data.train_size", "384", "--data.val_size", "128", "--data.test_size", "192"]
FAST = [
    "--probe.fast.batch_size",
    "64",
    "--probe.fast.cls_steps",
    "300",
    "--probe.fast.seg_steps",
    "300",
    "--probe.fast.depth_steps",
    "300",
]


def probe(*args):
    main(["probe", *args, *SMALL_DATA, *FAST])


def summary(folder):
    return json.loads((folder / "summary.json").read_text())


@pytest.fixture(scope="session")
def trained_run(trained_tiny_run):
    """The trained tiny run, probed once (in its own folder)."""
    probe(str(trained_tiny_run))
    return trained_tiny_run


@pytest.fixture(scope="session")
def random_probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("random") / "probe"
    probe(
        "--model",
        "vit_tiny_patch16_224",
        "--pretrained",
        "false",
        "--num_registers",
        "2",
        "--model_kwargs",
        TRAINED_MODEL,
        "--output",
        str(out),
    )
    return out


def test_trained_backbone_beats_a_random_one(trained_run, random_probe):
    trained, random = summary(trained_run), summary(random_probe)
    print(
        {
            k: (trained[k], random[k])
            for k in ("probe/cls_top1", "probe/seg_miou", "probe/depth_rmse", "probe/lost_corloc")
        }
    )
    assert trained["probe/cls_top1"] > random["probe/cls_top1"] + 0.3
    assert trained["probe/seg_miou"] > random["probe/seg_miou"] + 0.05
    assert trained["probe/lost_corloc"] > random["probe/lost_corloc"] + 0.1
    # Depth is visible in the scenes (a ground-plane background, nearer objects brighter), but a
    # backbone trained to classify keeps no more of it than a random one does (RMSE ~1.8-2.0 for
    # both, seen here), so trained and random are not compared: both must beat predicting the
    # train split's mean depth everywhere. The oracle test below checks the probe itself.
    mean_predictor = constant_depth_rmse(train_size=384, test_size=192)
    assert 0 < trained["probe/depth_rmse"] < 0.9 * mean_predictor
    assert 0 < random["probe/depth_rmse"] < 0.9 * mean_predictor


def constant_depth_rmse(train_size: int, test_size: int) -> float:
    """RMSE on the test scenes of a probe that predicts the mean train depth at every pixel."""
    train = torch.stack(
        [SyntheticScenesDataset(split="train", size=train_size, img_size=32)[i]["depth"] for i in range(train_size)]
    )
    test = torch.stack(
        [SyntheticScenesDataset(split="test", size=test_size, img_size=32)[i]["depth"] for i in range(test_size)]
    )
    return float((test - train.mean()).square().mean().sqrt())


def test_results_and_protocol_are_written(trained_run):
    values = summary(trained_run)
    assert values["status"] == "complete"  # the fit's summary is kept, the probe's merged in
    details = json.loads((trained_run / "probe.json").read_text())
    cls = details["protocol"]["cls"]
    assert len(cls["lrs"]) >= 8 and values["probe/cls_lr"] in cls["lrs"]
    assert values["probe/cls_lr"] == cls["selected"]["lr"] and values["probe/cls_features"] in ("cls", "cls+mean")
    best = max(max(per_lr.values()) for per_lr in cls["val_top1"].values())
    assert values["probe/cls_val_top1"] == pytest.approx(best)
    assert details["source"]["num_registers"] == 2 and details["skipped"] == {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run / "probe")).Reload()
    assert {"probe/cls_top1", "probe/seg_miou", "probe/depth_rmse", "probe/lost_corloc"} <= set(
        events.Tags()["scalars"]
    )


def test_rerun_reads_the_cache_and_gives_the_same_result(trained_run, tmp_path, monkeypatch, capsys):
    before = summary(trained_run)
    old = trained_run / "probe_cache" / "0123456789abcdef"  # a store of the safetensors layout (format 3)
    (old / "train").mkdir(parents=True)
    (old / "train" / "cls.safetensors").write_bytes(b"format 3")
    monkeypatch.setattr(probe_run, "extract_split", lambda *a, **k: pytest.fail("re-extracted despite the cache"))
    probe(str(trained_run))
    assert f"probe: removed {old}, a feature store of an older format" in capsys.readouterr().out
    assert not old.exists()
    after = summary(trained_run)
    keys = [k for k in before if k.startswith("probe/") and k != "probe/seconds"]
    assert {k: after[k] for k in keys} == {k: before[k] for k in keys}
    monkeypatch.undo()
    probe(str(trained_run), "--cache", "false", "--output", str(tmp_path / "fresh"))
    assert {k: summary(tmp_path / "fresh")[k] for k in keys} == {k: before[k] for k in keys}
    assert not (tmp_path / "fresh" / "probe_cache").exists()
    assert not (tmp_path / "fresh" / ".probe_features").exists(), "the scratch store is deleted"


def test_a_cache_written_by_another_backbone_is_refused(trained_run, random_probe, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ours = next((run / "probe_cache").iterdir())
    foreign = next((random_probe / "probe_cache").iterdir())
    for name in ("cls.npy", "cls.json"):  # the field and its provenance
        shutil.copy(foreign / "train" / name, ours / "train" / name)
    with pytest.raises(SystemExit) as exit_info:
        probe(str(run))
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("regablate: error: probe cache") and "another backbone" in message and "\n" not in message


def test_a_checkpoint_that_does_not_load_is_one_line(tmp_path, capsys):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        probe("--checkpoint", str(bad))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("regablate: error: cannot read checkpoint") and "\n" not in err


class OracleScenes(SyntheticScenes):
    """Synthetic scenes whose "images" are the answers: channels mask, depth and main-object indicator."""

    def dataset(self, split):
        return _OracleDataset(super().dataset(split))


class _OracleDataset(torch.utils.data.Dataset):
    def __init__(self, scenes):
        self.scenes = scenes

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, index):
        sample = self.scenes[index]
        main = (sample["mask"] == sample["label"] + 1).float()
        sample["image"] = torch.stack([sample["mask"].float(), sample["depth"], main])
        return sample


class OracleExtractor(nn.Module):
    """One token per pixel: one-hot mask class, one-hot depth level and depth; CLS: one-hot label;
    keys: +-1 on the main object."""

    def __init__(self, num_classes):
        super().__init__()
        self.register_buffer("levels", torch.linspace(0.5, 13.5, 28))
        self.num_classes = num_classes

    def forward(self, images):
        mask, depth, main = images[:, 0].long(), images[:, 1], images[:, 2]
        level = (depth[..., None] - self.levels).abs().argmin(dim=-1)
        patches = torch.cat(
            [nn.functional.one_hot(mask, self.num_classes + 1), nn.functional.one_hot(level, 28), depth[..., None]],
            dim=-1,
        ).float()
        counts = nn.functional.one_hot(mask, self.num_classes + 1).sum(dim=(1, 2))[:, 1:]
        cls = nn.functional.one_hot(counts.argmax(dim=1), self.num_classes).float()
        return BatchFeatures(cls=cls, patches=patches, keys=(main * 2 - 1)[..., None])


def test_features_that_carry_the_answers_score_near_perfectly(tmp_path):
    data = OracleScenes(img_size=16, num_classes=4, train_size=128, val_size=32, test_size=64, batch_size=32)
    report = run_probe(
        OracleExtractor(4),
        data,
        LinearProbe(fast=FastSettings(batch_size=32, cls_steps=200, seg_steps=300, depth_steps=400)),
        output_dir=tmp_path,
        patch_size=(1, 1),
        data_config={"oracle": 1},
    )
    metrics = report.metrics
    assert metrics["probe/cls_top1"] == 1.0
    assert metrics["probe/seg_miou"] > 0.97
    assert metrics["probe/depth_rmse"] < 0.3  # depth spans 1..13
    assert metrics["probe/lost_corloc"] > 0.95


def test_data_without_a_probes_columns_skip_it_with_a_warning(tmp_path, offline_hf, caplog):
    rng = np.random.default_rng(0)
    rows = lambda n: {  # noqa: E731
        "image": [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(n)],
        "label": [i % 2 for i in range(n)],
        "seg": [Image.fromarray((rng.random((16, 16)) > 0.5).astype(np.uint8)) for _ in range(n)],
    }
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict(rows(24)),
        validation=datasets.Dataset.from_dict(rows(8)),
        test=datasets.Dataset.from_dict(rows(8)),
    ).save_to_disk(str(tmp_path / "saved"))
    data = HFDataModule(str(tmp_path / "saved"), mask_column="seg", img_size=16, batch_size=8)
    extractor = OracleExtractor(1)
    extractor.forward = lambda images: BatchFeatures(
        images.mean(dim=(2, 3)), images.permute(0, 2, 3, 1), images.permute(0, 2, 3, 1)
    )
    with caplog.at_level(logging.WARNING):
        report = run_probe(
            extractor,
            data,
            LinearProbe(fast=FastSettings(batch_size=8, cls_steps=5, seg_steps=5, depth_steps=5)),
            output_dir=tmp_path / "out",
            patch_size=(1, 1),
            data_config={"hf": 1},
        )
    assert set(report.skipped) == {"depth", "lost"} and "'depth'" in report.skipped["depth"]
    assert "skipping the depth probe" in caplog.text and "skipping the lost probe" in caplog.text
    assert {"probe/cls_top1", "probe/seg_miou"} <= set(report.metrics)
    assert "probe/depth_rmse" not in summary(tmp_path / "out")
