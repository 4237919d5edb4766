"""`regablate probe` on its devices: settings that cannot run, the dry run, data without a test split,
data that cannot load, two processes against one, and a sweep whose probe stage fails for one run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from regablate.cli import main
from regablate.data import SyntheticScenes
from regablate.models import build_backbone
from regablate.probe import FastSettings, LinearProbe, ViTExtractor, run_probe
from tests.conftest import REPO, TINY, TINY_MODEL, run_regablate

MODEL = ["--model", TINY_MODEL, "--pretrained", "false", "--num_registers", "2"]
SIZES = ["--model_kwargs", "{patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}"]
DATA = ["--data.img_size", "32", "--data.train_size", "96", "--data.val_size", "32", "--data.test_size", "48"]
FAST = ["--probe.fast.cls_steps", "20", "--probe.fast.seg_steps", "20", "--probe.fast.depth_steps", "20"]
FAST += ["--probe.fast.lrs", "[0.01, 0.1]"]


def probe_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["probe", *args])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bar of `datasets`
    assert message.startswith("regablate: error: "), message
    return message


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--accelerator", "gpu"], "--accelerator gpu: torch sees no GPU here"),
        (["--accelerator", "cpu", "--devices", "512"], "--devices 512: only"),
        (["--accelerator", "cpu", "--precision", "16-mixed"], "--precision 16-mixed needs a GPU"),
        (["--devices", "0"], "--devices: 0 is not a PositiveInt"),
    ],
)
def test_device_settings_that_cannot_run_here_fail_in_one_line_and_write_nothing(tmp_path, capsys, flags, expected):
    if torch.cuda.is_available() and flags[:2] == ["--accelerator", "gpu"]:
        pytest.skip("this machine has a GPU")
    message = probe_error(capsys, *MODEL, *SIZES, *DATA, "--output", str(tmp_path / "out"), *flags)
    assert expected in message
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_samples_and_bytes_per_split_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    main(["probe", *MODEL, *SIZES, *DATA, "--output", str(out), "--probe.probes", "[cls]", "--dry_run", "true"])
    printed = capsys.readouterr().out
    # CLS and mean patch (2 x 32 float32) and an int64 label: 264 bytes per sample, whatever the patches.
    lines = {line.split()[0]: line.split() for line in printed.splitlines() if line.split()}
    assert lines["train"][:4] == ["train", "96", "25.3", "kB"] and lines["train"][4:6] == ["to", "extract"]
    assert lines["val"][:4] == ["val", "32", "8.4", "kB"] and lines["test"][:4] == ["test", "48", "12.7", "kB"]
    assert "cls, mean_patch, label" in printed and "patches" not in printed
    assert "scored on: test" in printed and "device: cpu x1, 32-true" in printed
    assert not out.exists()
    main(["probe", *MODEL, *SIZES, *DATA, "--output", str(out), "--probe.probes", "[cls]", "--dry-run"])
    captured = capsys.readouterr()
    assert "--dry-run is deprecated, use --dry_run true" in captured.err and "train" in captured.out
    assert not out.exists()


class NoTestScenes(SyntheticScenes):
    """Synthetic scenes of a dataset without a test split (ImageNet with ``test_split: null``)."""

    def has_split(self, split: str) -> bool:
        return split != "test"

    def dataset(self, split: str):
        assert split != "test", "the probe read the test split of data that have none"
        return super().dataset(split)


def test_without_a_test_split_every_score_is_val_and_val_is_extracted_once(tmp_path):
    torch.manual_seed(0)
    extractor = ViTExtractor(build_backbone(TINY_MODEL, 2, **TINY))
    data = NoTestScenes(img_size=32, num_classes=4, train_size=96, val_size=32, batch_size=32)
    report = run_probe(
        extractor,
        data,
        LinearProbe(fast=FastSettings(cls_steps=20, seg_steps=20, depth_steps=20, lrs=[0.01, 0.1])),
        output_dir=tmp_path,
        patch_size=(4, 4),
        data_config={"no_test": 1},
    )
    scores = {"probe/cls_val_top1", "probe/seg_val_miou", "probe/depth_val_rmse", "probe/lost_val_corloc"}
    assert scores <= set(report.metrics)
    assert not {"probe/cls_top1", "probe/seg_miou", "probe/depth_rmse", "probe/lost_corloc"} & set(report.metrics)
    details = json.loads((tmp_path / "probe.json").read_text())
    assert details["protocol"]["scored_on"] == "val" and "no test split" in details["protocol"]["scored_on_why"]
    assert set(details["features"]) == {"train", "val"}
    # val holds what selection and scoring read, once: the classifier's inputs, patches, keys and targets.
    assert details["features"]["val"]["fields"] == sorted(
        ["cls", "mean_patch", "patches", "keys", "label", "mask", "depth", "box"]
    )
    cache = next((tmp_path / "probe_cache").iterdir())
    assert sorted(p.name for p in cache.iterdir()) == ["train", "val"]


def write_image_folder(root: Path, splits: dict[str, int], corrupt: tuple[str, ...] = ()) -> Path:
    """An image folder with split sub-folders of two classes; the ``corrupt`` splits' files are not images."""
    rng = np.random.default_rng(0)
    for split, count in splits.items():
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                path = folder / f"{index}.png"
                if split in corrupt:
                    path.write_bytes(b"not a png")
                else:
                    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
    return root


def test_data_that_cannot_load_fail_in_one_line_before_any_work(tmp_path, offline_hf, capsys):
    folder = write_image_folder(tmp_path / "images", {"train": 4, "validation": 2, "test": 2}, corrupt=("test",))
    data = ["--data", "regablate.data.HFDataModule", "--data.path", str(folder), "--data.img_size", "32"]
    message = probe_error(capsys, *MODEL, *SIZES, *data, "--output", str(tmp_path / "out"))
    assert "cannot load the first test sample" in message and "check --data" in message
    assert not (tmp_path / "out").exists()


def probe_process(out: Path, devices: int, *extra: str) -> str:
    args = [*MODEL, *SIZES, *DATA, *FAST, "--accelerator", "cpu", "--devices", str(devices), "--output", str(out)]
    return run_regablate("probe", *args, *extra, timeout=600).stdout


@pytest.mark.slow
def test_two_processes_extract_what_one_extracts(tmp_path):
    """A random backbone (seeded, the same on every rank), a test-time register searched on rank 0 and
    broadcast, extraction split by batches: two ranks store the same bytes and score the same."""
    one = probe_process(tmp_path / "one", 1, "--test_time_registers", "auto")
    two = probe_process(tmp_path / "two", 2, "--test_time_registers", "auto")
    assert "rank 0's share of 2" in two and "rank 0's share" not in one
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two")]
    scores = [{k: v for k, v in s.items() if k.startswith("probe/") and k != "probe/seconds"} for s in summaries]
    assert scores[0] == scores[1] and "probe/cls_top1" in scores[0]
    assert summaries[0]["test_time_registers"] == summaries[1]["test_time_registers"] == 1
    stores = [next((tmp_path / name / "probe_cache").iterdir()) for name in ("one", "two")]
    files = sorted(p.relative_to(stores[0]) for p in stores[0].rglob("*.*"))  # fields (.npy), provenance (.json)
    assert files == sorted(p.relative_to(stores[1]) for p in stores[1].rglob("*.*")) and len(files) > 20
    for name in files:
        assert (stores[0] / name).read_bytes() == (stores[1] / name).read_bytes(), name


@pytest.mark.slow
def test_a_sample_that_does_not_load_mid_extraction_stops_every_rank_in_one_line(tmp_path):
    """Rank 0's share holds an unreadable image (not the first, which the plan reads): rank 0 stops the
    other rank, which would wait for it, and the command ends in one line with nothing half-written."""
    folder = write_image_folder(tmp_path / "images", {"train": 2, "validation": 2, "test": 2})
    (folder / "train" / "a" / "1.png").write_bytes(b"not a png")  # sample 1 of 4: rank 0's second batch
    data = ["--data", "regablate.data.HFDataModule", "--data.path", str(folder), "--data.img_size", "32"]
    args = [*MODEL, *SIZES, *data, "--data.batch_size", "1", "--accelerator", "cpu", "--devices", "2"]
    out = tmp_path / "out"
    result = run_regablate("probe", *args, "--output", str(out), check=False, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stderr + result.stdout, "both ranks started"
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("regablate: error: cannot load a train sample in rows 0..1"), last
    assert not out.exists(), "nothing half-written: no summary, no feature file, no empty folder"


@pytest.mark.slow
def test_a_probe_stage_that_cannot_load_its_data_fails_that_run_and_the_others_go_on(tmp_path):
    good = write_image_folder(tmp_path / "good", {"train": 8, "validation": 4, "test": 4})
    broken = write_image_folder(tmp_path / "broken", {"train": 8, "validation": 4, "test": 4}, corrupt=("test",))
    base = (REPO / "tests" / "configs" / "tiny.yaml").read_text()
    base = base.replace(
        "  class_path: regablate.data.SyntheticScenes\n"
        "  init_args: {img_size: 32, num_classes: 4, train_size: 64, val_size: 32, test_size: 32, batch_size: 16}",
        "  class_path: regablate.data.HFDataModule\n  init_args: {path: null, img_size: 32, batch_size: 8}",
    ).replace("num_classes: 4", "num_classes: 2")
    (tmp_path / "hf_tiny.yaml").write_text(base)
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"grid:\n  name: hf\n  base: {tmp_path / 'hf_tiny.yaml'}\n  axes:\n    data:\n"
        f"      good: {{data.init_args.path: {good}}}\n      broken: {{data.init_args.path: {broken}}}\n"
        "  stages:\n    - {command: fit}\n    - {command: probe, args: {--probe.probes: [cls], "
        "--probe.fast.cls_steps: 5, --cache: false}}\n  report: {enabled: false}\n"
    )
    result = run_regablate("sweep", str(grid), "--output", str(tmp_path / "runs"), check=False, timeout=600)
    assert result.returncode == 2 and "1 of 2 runs failed: broken" in result.stderr
    runs = tmp_path / "runs" / "hf"
    good_run, broken_run = (json.loads((runs / name / "summary.json").read_text()) for name in ("good", "broken"))
    assert good_run["stages/probe"] == "complete" and "probe/cls_top1" in good_run
    assert broken_run["stages/fit"] == "complete" and broken_run["stages/probe"] == "failed"
    assert broken_run["stages/probe/exit_code"] == 2
    assert "regablate: error: cannot load the first test sample" in broken_run["stages/probe/log_tail"]
    assert not any(key.startswith("probe/") for key in broken_run), "nothing half-written"
