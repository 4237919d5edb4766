"""The data preflight: each stage's data checked from metadata (no image read, no network), and the sweep's use."""

from __future__ import annotations

import re
import time

import datasets
import numpy as np
import pytest
from PIL import Image

from regablate.cli import main as regablate_main
from regablate.data.ade20k import prepare_ade20k
from regablate.data.preflight import check_data
from tests.conftest import REPO
from tests.formats import write_ade_zip, write_imagenet_parquet, write_imagenet_wds

pytestmark = pytest.mark.usefixtures("offline_hf")
HF = "regablate.data.HFDataModule"


def hf(path, **init_args):
    return {"class_path": HF, "init_args": {"path": str(path), **init_args}}


@pytest.fixture
def ade(tmp_path):
    prepare_ade20k(str(write_ade_zip(tmp_path / "ADE.zip")), str(tmp_path / "ade20k"))
    return tmp_path / "ade20k"


SEG = {"mask_column": "annotation", "label_column": None, "test_split": None}


@pytest.fixture
def no_image_reads(monkeypatch):
    """Any image decode fails the test: the preflight reads metadata only."""

    def refuse(*args, **kwargs):
        raise AssertionError("the preflight opened an image")

    monkeypatch.setattr(Image, "open", refuse)


def test_prepared_and_local_formats_pass_without_reading_an_image(tmp_path, ade, no_image_reads):
    check = check_data(hf(ade, **SEG))
    assert check.status == "ok", check.message
    assert "train 'train', val 'validation', no test split" in check.message and "annotation fit" in check.message
    parquet = write_imagenet_parquet(tmp_path / "parquet")
    assert check_data(hf(parquet, test_split=None)).status == "ok"
    wds = write_imagenet_wds(tmp_path / "wds")
    check = check_data(hf(wds, image_column="jpg", label_column="cls"))
    assert check.status == "ok" and "(folder)" in check.message, check.message


def test_synthetic_data_and_other_classes(no_image_reads):
    assert check_data({"class_path": "regablate.data.SyntheticScenes", "init_args": {}}).status == "ok"
    other = check_data({"class_path": "my.package.MyData", "init_args": {}})
    assert other.status == "unchecked" and "no preflight" in other.message


@pytest.mark.parametrize(
    "init_args, message",
    [
        ({**SEG, "mask_column": "seg"}, r"column 'seg' not found in split 'train'; columns: image, annotation"),
        ({"mask_column": "annotation"}, r"column 'label' not found"),  # label_column defaults to 'label'
        ({**SEG, "train_split": "training"}, r"split 'training' not found; splits: train, validation"),
        ({**SEG, "val_split": "dev"}, r"no split 'dev' \(splits: train, validation\); set val_split"),
        ({**SEG, "label_column": "annotation"}, r"column 'annotation' \(label_column\) holds Image, not class labels"),
    ],
)
def test_missing_splits_columns_and_wrong_types_are_errors(ade, init_args, message):
    check = check_data(hf(ade, **init_args))
    assert check.status == "error"
    assert re.search(message, check.message), check.message


def test_feature_types_of_arrays(tmp_path, no_image_reads):
    rows = {
        "image": [np.zeros((4, 4, 3), dtype=np.uint8)] * 2,
        "seg": [np.zeros((4, 4), dtype=np.int64)] * 2,
        "depth": [np.ones((4, 4), dtype=np.float32)] * 2,
        "name": ["a", "b"],
        "box": [[0.0, 0.0, 2.0, 2.0]] * 2,
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "seg": datasets.Array2D((4, 4), "int64"),
            "depth": datasets.List(datasets.List(datasets.Value("float32"))),
            "name": datasets.Value("string"),
            "box": datasets.List(datasets.Value("float32")),
        }
    )
    datasets.DatasetDict(train=datasets.Dataset.from_dict(rows, features=features)).save_to_disk(str(tmp_path / "a"))
    base = {"label_column": None, "val_fraction": 0.5}
    good = check_data(hf(tmp_path / "a", mask_column="seg", depth_column="depth", box_column="box", **base))
    assert good.status == "ok" and "val 50% of train" in good.message, good.message
    assert (
        "not images or 2-D arrays of class ids" in check_data(hf(tmp_path / "a", mask_column="depth", **base)).message
    )
    assert "not images or 2-D arrays of depths" in check_data(hf(tmp_path / "a", depth_column="name", **base)).message
    assert "not a box" in check_data(hf(tmp_path / "a", box_column="seg", **base)).message
    assert "not images" in check_data(hf(tmp_path / "a", image_column="name", **base)).message


def test_hub_names_offline_script_based_and_missing_folders(tmp_path):
    offline = check_data(hf("ILSVRC/imagenet-1k"))
    assert offline.status == "unchecked" and "offline and not in the cache" in offline.message
    script = check_data(hf("scene_parse_150"))
    assert script.status == "error" and "scripts/prepare_ade20k.py" in script.message
    missing = check_data(hf(tmp_path / "nowhere"))
    assert missing.status == "error" and "data folder not found" in missing.message


def grid_file(tmp_path, seg_path):
    """The micro grid's tiny fit, then a probe on a segmentation dataset (``seg_path``)."""
    path = tmp_path / "grid.yaml"
    path.write_text(
        f"""grid:
  name: pre
  base: {REPO / "tests" / "configs" / "tiny.yaml"}
  axes: {{model.init_args.num_registers: [0, 2], seed_everything: [0]}}
  stages:
    - {{name: fit, command: fit}}
    - name: probe_seg
      command: probe
      args: {{--data: {HF}, --data.init_args.path: "{seg_path}", --data.init_args.mask_column: annotation,
             --data.init_args.label_column: null, --data.init_args.test_split: null, --probe.probes: [seg]}}
"""
    )
    return path


def sweep(tmp_path, grid, *args):
    with pytest.raises(SystemExit) as ended:
        regablate_main(["sweep", str(grid), "--output", str(tmp_path / "runs"), *args])
    return ended.value.code


def test_dry_run_reports_each_stage_in_one_line(tmp_path, ade, capsys):
    regablate_main(["sweep", str(grid_file(tmp_path, ade)), "--output", str(tmp_path / "runs"), "--dry_run", "true"])
    out = capsys.readouterr().out
    lines = out[out.index("preflight:") :].splitlines()
    assert lines[1] == "  fit: ok: SyntheticScenes (rendered, nothing to load)"
    assert lines[2].startswith(f"  probe_seg: ok: {ade} (disk): train 'train', val 'validation', no test split")
    assert len(lines) == 3 and not (tmp_path / "runs").exists()


def test_a_later_stage_that_cannot_load_stops_the_sweep_before_anything_runs(tmp_path, capsys):
    grid = grid_file(tmp_path, tmp_path / "not_prepared")
    assert sweep(tmp_path, grid, "--dry_run", "true") == 2
    captured = capsys.readouterr()
    assert "  probe_seg: ERROR: data folder not found" in captured.out
    assert captured.err.startswith("regablate: error: preflight: stage probe_seg cannot run")
    started = time.perf_counter()
    assert sweep(tmp_path, grid) == 2  # the real sweep: refused before any fit
    assert time.perf_counter() - started < 30 and not (tmp_path / "runs").exists()
    assert "probe_seg: ERROR" in capsys.readouterr().out


def test_preflight_false_skips_the_check(tmp_path, capsys):
    grid = grid_file(tmp_path, tmp_path / "not_prepared")
    regablate_main(
        ["sweep", str(grid), "--output", str(tmp_path / "runs"), "--dry_run", "true", "--preflight", "false"]
    )
    out = capsys.readouterr().out
    assert "r2_s0: new, fit -> probe_seg" in out and "preflight:" not in out


def test_a_dinov2_probe_on_more_blocks_than_the_model_has_is_refused_before_the_fit(tmp_path, capsys):
    """tiny.yaml's ViT has 2 blocks; DINOv2's heads read the last 1 and 4 by default."""
    path = tmp_path / "deep.yaml"
    path.write_text(
        f"""grid:
  name: deep
  base: {REPO / "tests" / "configs" / "tiny.yaml"}
  axes: {{model.init_args.num_registers: [0], seed_everything: [0]}}
  stages:
    - {{name: fit, command: fit}}
    - {{name: probe_cls, command: probe, args: {{--probe.protocol: dinov2, --probe.probes: [cls]}}}}
"""
    )
    assert sweep(tmp_path, path) == 2
    captured = capsys.readouterr()
    assert "  probe_cls: ERROR: --probe.dinov2.cls_n_last_blocks reads the last 4 blocks, the run's model has 2" in (
        captured.out
    )
    assert captured.err.startswith("regablate: error: preflight: stage probe_cls cannot run")
    assert not (tmp_path / "runs").exists()
    path.write_text(path.read_text().replace("[cls]}", "[cls], --probe.dinov2.cls_n_last_blocks: [1, 2]}"))
    regablate_main(["sweep", str(path), "--output", str(tmp_path / "runs"), "--dry_run", "true"])
    assert "  probe_cls: ok: SyntheticScenes" in capsys.readouterr().out


def test_a_token_probe_below_the_models_blocks_is_refused_before_the_fit(tmp_path, capsys):
    """tiny.yaml's ViT has 2 blocks."""
    path = tmp_path / "tokens.yaml"
    path.write_text(
        f"""grid:
  name: tokens
  base: {REPO / "tests" / "configs" / "tiny.yaml"}
  axes: {{model.init_args.num_registers: [0], seed_everything: [0]}}
  stages:
    - {{name: fit, command: fit}}
    - {{name: probe, command: probe, args: {{--probe.probes: [token], --token_probe.block: 2}}}}
"""
    )
    assert sweep(tmp_path, path) == 2
    assert "  probe: ERROR: --token_probe.block 2 is outside the run's model's 2 blocks; give -2..1" in (
        capsys.readouterr().out
    )
    assert not (tmp_path / "runs").exists()
    path.write_text(path.read_text().replace("block: 2}", "block: -2}"))
    regablate_main(["sweep", str(path), "--output", str(tmp_path / "runs"), "--dry_run", "true"])
    assert "  probe: ok: SyntheticScenes" in capsys.readouterr().out


def test_the_depth_of_a_timm_model_without_model_kwargs_comes_from_timm():
    from regablate.sweep.preflight import model_depth

    assert model_depth({"model_name": "vit_large_patch14_dinov2"}) == 24
    assert model_depth({"model_name": "vit_small_patch16_224", "model_kwargs": {"depth": 3}}) == 3
