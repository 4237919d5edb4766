"""Token probes: planted tokens that copy a global feature classify better and localise worse than normal
patches; empty kinds and missing labels give no number; inspect, probe and report write and show the table."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from regablate.artifacts.register_neurons import NeuronSearch, add_test_time_register, find_register_neurons
from regablate.artifacts.token_probes import TokenProbes, folder_splits, run_token_probes, scene_splits
from regablate.artifacts.token_tables import NOT_A_PATCH, report_section, summary_keys, text_table
from regablate.cli import main
from regablate.data.synthetic import IMAGENET_MEAN, IMAGENET_STD
from tests.planted import CORNERS, MODEL, SIZES, copy_global_feature, plant_artifacts, tiny_vit

SMALL = TokenProbes(train_images=96, test_images=64, steps=150)
SIZE_ARGS = [f"--{k}={v}" for k, v in SIZES.items()]
FAST_ARGS = ["--token_probe.train_images", "32", "--token_probe.test_images", "16", "--token_probe.steps", "20"]


def scenes(settings: TokenProbes = SMALL) -> list:
    return list(scene_splits(0, settings, (32, 32), IMAGENET_MEAN, IMAGENET_STD))


def lift(cell: dict) -> float:
    """Top-1 above the kind's chance level."""
    return cell["value"] - cell["chance"]


def test_planted_tokens_that_copy_a_global_feature_classify_better_and_localise_worse():
    model = plant_artifacts(tiny_vit(), onset=1)
    copy_global_feature(model, block=1)
    table = run_token_probes(model, scenes(), settings=SMALL).table
    kinds = table["kinds"]
    assert list(kinds) == ["cls", "register_1", "register_2", "normal", "outlier"]
    normal, outlier = kinds["normal"], kinds["outlier"]
    assert outlier["tokens"] == {"train": 96 * len(CORNERS), "test": 64 * len(CORNERS)}
    assert normal["tokens"] == {"train": 96 * (64 - len(CORNERS)), "test": 64 * (64 - len(CORNERS))}
    assert outlier["class"]["tokens"] == outlier["tokens"] and normal["pixels"]["tokens"] == normal["tokens"]
    assert outlier["class"]["value"] > normal["class"]["value"] + 0.05  # global information (Table 1)
    assert lift(outlier["position"]) < lift(normal["position"]) - 0.05  # little local information (Fig. 5b)
    assert abs(lift(outlier["position"])) < 0.05 and outlier["position"]["chance"] == pytest.approx(1 / len(CORNERS))
    assert outlier["pixels"]["value"] > normal["pixels"]["value"] + 0.05
    for kind in ("cls", "register_1", "register_2"):
        assert kinds[kind]["position"] == kinds[kind]["pixels"] == {"value": None, "why": NOT_A_PATCH}
        assert kinds[kind]["class"]["value"] is not None
    assert table["threshold"]["mode"] == "relative" and table["images"] == {"train": 96, "test": 64}


def test_planted_outliers_that_keep_their_own_content_still_localise():
    """The probes read what the tokens hold, not their norm: outliers without the copy keep their position."""
    model = plant_artifacts(tiny_vit(), onset=1)
    kinds = run_token_probes(model, scenes(), settings=SMALL).table["kinds"]
    assert lift(kinds["outlier"]["position"]) > 0.1  # the copy above leaves it near 0


def test_a_test_time_register_is_a_kind_of_its_own_and_takes_the_outliers():
    model = plant_artifacts(tiny_vit(), onset=1)
    images = scenes(SMALL)[0][0][:8]
    add_test_time_register(model, find_register_neurons(model, images, NeuronSearch(top_k=1), model_name="planted"))
    kinds = run_token_probes(model, scenes(), settings=SMALL).table["kinds"]
    assert list(kinds) == ["cls", "register_1", "register_2", "test_time_register", "normal", "outlier"]
    assert kinds["test_time_register"]["position"] == {"value": None, "why": NOT_A_PATCH}
    assert kinds["test_time_register"]["class"]["value"] is not None
    assert kinds["outlier"]["tokens"] == {"train": 0, "test": 0}, "the register holds what the outliers held"


def test_a_kind_with_more_tokens_than_max_tokens_trains_on_a_draw_and_says_so():
    settings = TokenProbes(train_images=8, test_images=8, steps=5, max_tokens=100)
    normal = run_token_probes(tiny_vit(), scenes(settings), settings=settings).table["kinds"]["normal"]
    assert normal["tokens"] == {"train": 8 * 64, "test": 8 * 64}
    assert normal["position"]["tokens"] == normal["class"]["tokens"] == {"train": 100, "test": 8 * 64}


def test_an_empty_kind_and_unlabelled_images_give_no_number_only_why():
    model = tiny_vit()  # no outliers
    images = [(images, None) for images, _ in scenes(TokenProbes(train_images=8, test_images=8))]
    table = run_token_probes(model, images, settings=TokenProbes(train_images=8, test_images=8, steps=5)).table
    outlier = table["kinds"]["outlier"]
    assert outlier["tokens"] == {"train": 0, "test": 0}
    assert (
        outlier["position"]
        == outlier["pixels"]
        == {"value": None, "why": "no tokens of this kind in the train and test images"}
    )
    assert table["kinds"]["normal"]["class"] == {"value": None, "why": "the images have no labels"}
    assert table["kinds"]["normal"]["position"]["value"] is not None
    keys = summary_keys(table, "probe/token_")
    assert set(keys) == {"probe/token_block", "probe/token_normal_position", "probe/token_normal_pixels"}
    rows = text_table(table)
    assert rows[-1].split()[:5] == ["outlier", "0/0", "none", "none", "none"]


def test_bad_settings_and_blocks_are_one_line():
    with pytest.raises(Exception, match="--token_probe.steps must be at least 1"):
        TokenProbes(steps=0)
    with pytest.raises(Exception, match="threshold value"):
        TokenProbes(threshold="percentile", threshold_value=100)
    with pytest.raises(Exception, match=r"--token_probe.block 4 is outside the model's 4 blocks \(give -4..3\)"):
        TokenProbes(block=4).block_of(tiny_vit())
    assert TokenProbes(block=-1).block_of(tiny_vit()) == 3


def test_image_folders_split_in_two_with_labels_from_class_subfolders(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for index in range(5):
            Image.fromarray(np.full((8, 8, 3), index * 40, np.uint8)).save(tmp_path / name / f"{index}.png")
    (train_images, train_labels), (test_images, test_labels) = folder_splits(
        tmp_path, TokenProbes(train_images=4, test_images=2), (8, 8), IMAGENET_MEAN, IMAGENET_STD
    )
    assert len(train_images) == 4 and len(test_images) == 2 and train_images.shape[1:] == (3, 8, 8)
    assert set(torch.cat([train_labels, test_labels]).tolist()) == {0, 1}


def planted_weights(tmp_path: Path) -> Path:
    path = tmp_path / "planted.safetensors"
    save_file(plant_artifacts(tiny_vit(), onset=1).state_dict(), str(path))
    return path


def test_inspect_with_token_probes_writes_the_table_the_map_and_the_keys(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", MODEL, "--checkpoint", str(planted_weights(tmp_path)), "--num_registers", "2", *SIZE_ARGS]
    main(["inspect", *args, "--num_images", "4", "--output", str(out), "--token_probes", "true", *FAST_ARGS])
    printed = capsys.readouterr().out
    table = json.loads((out / "token_probes.json").read_text())
    assert table["block"] == 3 and table["images"] == {"train": 32, "test": 16}
    assert table["kinds"]["outlier"]["tokens"] == {"train": 32 * 4, "test": 16 * 4}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["token_probes/block"] == 3 and "token_probes/outlier_class" in stats
    assert Image.open(out / "outlier_map.png").size[0] > 100
    assert "token probes     : block 3" in printed and "\n  outlier " in printed


@pytest.mark.parametrize("command", ["inspect", "probe"])
def test_a_block_outside_the_model_fails_in_one_line_and_writes_nothing(tmp_path, capsys, command):
    out = tmp_path / "out"
    args = ["--model", MODEL, "--checkpoint", str(planted_weights(tmp_path)), "--num_registers", "2"]
    if command == "inspect":
        args += [*SIZE_ARGS, "--token_probes", "true"]
    else:
        args += ["--model_kwargs", json.dumps({k: v for k, v in SIZES.items() if k != "img_size"})]
        args += ["--data.img_size", "32", "--probe.probes", "[token]"]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *args, "--token_probe.block", "7", "--output", str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--token_probe.block 7 is outside the model's 4 blocks" in error[0]
    assert not out.exists()


def test_probe_runs_the_token_probe_alone_and_the_report_shows_its_table(tmp_path, capsys):
    run = tmp_path / "grid" / "r2_s0"
    sizes = json.dumps({k: v for k, v in SIZES.items() if k != "img_size"})
    args = ["--model", MODEL, "--checkpoint", str(planted_weights(tmp_path)), "--num_registers", "2"]
    args += ["--model_kwargs", sizes, "--data.img_size", "32", "--data.train_size", "32", "--data.val_size", "16"]
    main(["probe", *args, "--data.test_size", "16", "--probe.probes", "[token]", *FAST_ARGS, "--output", str(run)])
    assert "token probes     : block 3, trained on 32 images, scored on 16" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == ["outlier_map.png", "summary.json", "token_probes.json"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_registers"] == 2 and summary["probe/token_block"] == 3
    assert {"probe/token_cls_class", "probe/token_normal_position", "probe/token_outlier_pixels"} <= set(summary)
    section = report_section(tmp_path / "grid", ["r0_s0", "r2_s0"])
    assert "### r2_s0: token probes at block 3 (32 train, 16 test images)" in section
    assert "| register_2 | 32/16 | - | - |" in section and "| outlier | 128/64 |" in section
    kinds = [line.split(" | ")[0].removeprefix("| ") for line in section.splitlines()[-5:]]
    assert kinds == ["cls", "register_1", "register_2", "normal", "outlier"], "in the table's order, not by name"
