"""`regablate inspect`: planted artifacts found, an untouched model cleared, ViTs without a class token,
image folders with masks and the verdict they allow, bad input in one line."""

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from regablate.cli import main
from regablate.data.images import fit_masks, image_files, load_images, read_masks
from tests.planted import MODEL, SIZES, plant_artifacts, tiny_vit

SIZE_ARGS = [f"--{k}={v}" for k, v in SIZES.items()]


def weights(tmp_path: Path, planted: bool, **plant) -> Path:
    model = tiny_vit()
    if planted:
        plant_artifacts(model, onset=1, **plant)
    path = tmp_path / ("planted.safetensors" if planted else "plain.safetensors")
    save_file(model.state_dict(), str(path))
    return path


def inspect(tmp_path: Path, checkpoint: Path, *extra: str) -> None:
    main(
        [
            "inspect",
            "--model",
            MODEL,
            "--checkpoint",
            str(checkpoint),
            "--num_registers",
            "2",
            *SIZE_ARGS,
            "--num_images",
            "8",
            "--output",
            str(tmp_path / "out"),
            *extra,
        ]
    )


def attention_columns(out: Path) -> list[str]:
    """attention.png's column titles, as its PNG text keeps them."""
    return Image.open(out / "attention.png").text["Columns"].split(" | ")


def test_inspect_finds_planted_artifacts_and_writes_every_output(tmp_path, capsys):
    inspect(tmp_path, weights(tmp_path, planted=True))
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["artifacts/outlier_frac/block_00"] == 0.0
    assert all(stats[f"artifacts/outlier_frac/block_{b:02d}"] == pytest.approx(4 / 64) for b in (1, 2, 3))
    assert stats["artifacts/outlier_onset_block"] == 1 and stats["num_registers"] == 2
    assert sorted(p.name for p in (out / "norms").iterdir()) == [f"block_{b:02d}.png" for b in range(4)]
    for picture in ("attention.png", "outlier_positions.png", "norms/block_03.png"):
        assert Image.open(out / picture).size[0] > 32
    assert attention_columns(out) == ["image", "CLS", "reg 1", "reg 2"]
    assert "outlier fraction : 6.25%" in printed and "outliers start at: block 1 of 0-3" in printed
    assert "max/median norm" in printed and "verdict          : register-style artifacts" in printed
    assert stats["verdict"]["label"] == "register-style" and stats["verdict"]["background_test"] == "run"
    assert Image.open(out / "outliers.png").size == (8 * 34 + 2, 34 + 2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder left"


def test_inspect_clears_an_untouched_model_and_replaces_its_earlier_output(tmp_path, capsys):
    checkpoint = weights(tmp_path, planted=False)
    inspect(tmp_path, checkpoint)
    inspect(tmp_path, checkpoint, "--threshold", "absolute", "--threshold_value", "1000")
    printed = capsys.readouterr().out
    assert "verdict          : no artifacts" in printed and "outliers start at: no block" in printed
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["threshold"] == "absolute" and stats["verdict"]["label"] == "no outliers"


def test_inspect_reads_an_image_folder(tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, size in [("a.png", (40, 30)), ("sub/b.jpg", (64, 64)), ("c.JPEG", (20, 50))]:
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    inspect(tmp_path, weights(tmp_path, planted=True), "--images", str(folder))
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["num_images"] == 3 and "artifacts/outlier_background_share" not in stats
    assert stats["artifacts/outlier_frac/block_02"] == pytest.approx(4 / 64)
    assert stats["masks"] is None and stats["verdict"]["background_test"].startswith("not run: no masks")
    assert "background       : not run: no masks" in capsys.readouterr().out


@pytest.mark.parametrize(
    "case, message",
    [
        ("threshold", "unknown threshold mode 'loud'"),
        ("blocks", "block index 4 is out of range for a ViT with 4 blocks"),
        ("empty", "no images (.jpg"),
        ("unreadable", "cannot read image {tmp}/photos/broken.png"),
        ("not-inspect-out", "exists and is not an inspect output folder"),
        ("no-model", "give --model NAME"),
        ("missing-checkpoint", "checkpoint not found: {tmp}/nothing.pt"),
    ],
)
def test_bad_input_fails_in_one_line_and_writes_nothing(tmp_path, capsys, case, message):
    checkpoint = weights(tmp_path, planted=False)
    photos = tmp_path / "photos"
    photos.mkdir()
    extra = {
        "threshold": ["--threshold", "loud"],
        "blocks": ["--blocks", "[0,4]"],
        "empty": ["--images", str(photos)],
        "unreadable": ["--images", str(photos)],
    }.get(case, [])
    if case == "unreadable":
        Image.new("RGB", (8, 8)).save(photos / "fine.png")
        (photos / "broken.png").write_bytes(b"not a png at all")
    if case == "not-inspect-out":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "thesis.tex").write_text("precious")
    with pytest.raises(SystemExit) as exit_info:
        if case == "no-model":
            main(["inspect", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")])
        elif case == "missing-checkpoint":
            main(
                [
                    "inspect",
                    "--model",
                    MODEL,
                    "--checkpoint",
                    str(tmp_path / "nothing.pt"),
                    "--output",
                    str(tmp_path / "out"),
                ]
            )
        else:
            inspect(tmp_path, checkpoint, *extra)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("regablate: error: ")
    assert message.format(tmp=tmp_path) in error[0]
    leftovers = {p.name for p in tmp_path.iterdir()} - {"photos", "plain.safetensors"}
    assert leftovers == ({"out"} if case == "not-inspect-out" else set())
    if case == "not-inspect-out":
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["thesis.tex"]


# --- image folders with masks ---------------------------------------------------------------------

# Patches (4 px) inside the object square of every scene below (pixels 8..23): rows 3-4, columns 3-4.
OBJECT_PATCHES = (27, 28, 35, 36)


def scenes_with_masks(tmp_path: Path, count: int = 8) -> tuple[Path, list[np.ndarray]]:
    """Photos of a smooth background with one textured object square (pixels 8..23), and their masks."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "photos"
    folder.mkdir()
    masks = []
    for index in range(count):
        image = np.empty((32, 32, 3), dtype=np.uint8)
        image[:] = rng.integers(40, 200, 3)  # one colour per photo: every background patch alike
        image[8:24, 8:24] = rng.integers(0, 255, (16, 16, 3))
        mask = np.zeros((32, 32), dtype=bool)
        mask[8:24, 8:24] = True
        Image.fromarray(image).save(folder / f"photo_{index}.png")
        masks.append(mask)
    return folder, masks


def write_png_masks(folder: Path, masks: list[np.ndarray]) -> Path:
    folder.mkdir()
    for index, mask in enumerate(masks):
        Image.fromarray((mask * 7).astype(np.uint8)).save(folder / f"photo_{index}.png")  # any non-zero = object
    return folder


def test_masks_of_an_image_folder_give_the_background_test_and_a_register_style_verdict(tmp_path, capsys):
    photos, masks = scenes_with_masks(tmp_path)
    mask_folder = write_png_masks(tmp_path / "masks", masks)
    inspect(tmp_path, weights(tmp_path, planted=True), "--images", str(photos), "--masks", str(mask_folder))
    printed = capsys.readouterr().out
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    # 16 of 64 patches are object: the planted corners are all background.
    assert stats["artifacts/patch_background_share"] == pytest.approx(48 / 64)
    assert stats["artifacts/outlier_background_share"] == 1.0 and stats["masks"] == str(mask_folder)
    verdict = stats["verdict"]
    assert verdict["label"] == "register-style" and verdict["background_test"] == "run"
    assert {name: test["side"] for name, test in verdict["tests"].items()} == {
        "background": "for",
        "attention": "for",
        "input redundancy": "for",
        "channels": "for",
    }
    assert "background       : 100% of them sit on background (all patches 75%) [for, x2]" in printed
    assert "verdict          : register-style artifacts (score +6 of 6; for: background, attention" in printed


@pytest.mark.parametrize("layout", ["per-stem", "stack"])
def test_high_norm_foreground_tokens_with_npz_masks_are_not_register_style(tmp_path, capsys, layout):
    photos, masks = scenes_with_masks(tmp_path)
    npz = tmp_path / "masks.npz"
    if layout == "per-stem":
        np.savez(npz, **{f"photo_{i}": mask for i, mask in enumerate(masks)})
    else:
        np.savez(npz, masks=np.stack(masks))
    checkpoint = weights(tmp_path, planted=True, positions=OBJECT_PATCHES, sink=False)
    inspect(tmp_path, checkpoint, "--images", str(photos), "--masks", str(npz))
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["artifacts/outlier_frac"] == pytest.approx(4 / 64) and stats["artifacts/outlier_background_share"] == 0
    verdict = stats["verdict"]
    assert verdict["label"] == "not register-style" and verdict["score"] < 0
    assert verdict["tests"]["background"]["side"] == "against" and verdict["tests"]["attention"]["side"] == "against"
    assert "verdict          : high-norm tokens, not register-style" in capsys.readouterr().out


def test_masks_follow_their_images_through_resize_and_crop(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    mask = np.zeros((48, 64), dtype=bool)  # landscape: resized to 32 px high, then centre-cropped to 32 x 32
    mask[10:30, 20:50] = True
    Image.fromarray(np.repeat(mask[..., None] * 255, 3, axis=2).astype(np.uint8)).save(folder / "x.png")
    files = image_files(folder, 4)
    images = load_images(files, (32, 32), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    np.savez(tmp_path / "m.npz", x=mask)
    loaded = fit_masks(read_masks(tmp_path / "m.npz", folder, files), (32, 32))
    assert loaded.shape == (1, 32, 32) and loaded.dtype == torch.int64 and set(loaded.unique().tolist()) == {0, 1}
    # The white object of the image and its mask cover the same pixels (up to the antialiased edge).
    assert ((images[0, 0] > 0.5).long() != loaded[0]).float().mean() < 0.04


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no mask for image {tmp}/photos/photo_3.png: expected {tmp}/masks/photo_3.png"),
        ("size", "the mask of {tmp}/photos/photo_0.png is 16x16 pixels but the image is 32x32"),
        ("no-images", "--masks needs --images"),
        ("npz-key", "has no mask for image {tmp}/photos/photo_0.png (no key 'photo_0')"),
        ("not-a-mask-source", "is neither a folder nor an .npz file"),
    ],
)
def test_bad_masks_fail_in_one_line_and_write_nothing(tmp_path, capsys, case, message):
    photos, masks = scenes_with_masks(tmp_path, count=4)
    checkpoint = weights(tmp_path, planted=False)
    if case == "missing":
        source = write_png_masks(tmp_path / "masks", masks[:3])
    elif case == "size":
        source = write_png_masks(tmp_path / "masks", [m[:16, :16] for m in masks])
    elif case == "npz-key":
        source = tmp_path / "masks.npz"
        np.savez(source, other=masks[0])
    else:
        source = tmp_path / "masks.txt"
        source.write_text("not masks")
    extra = ["--masks", str(source)] if case == "no-images" else ["--images", str(photos), "--masks", str(source)]
    with pytest.raises(SystemExit) as exit_info:
        inspect(tmp_path, checkpoint, *extra)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message.format(tmp=tmp_path) in error[0], error
    assert not (tmp_path / "out").exists()


# --- ViTs without a class token ---------------------------------------------------------------------


def test_the_issue_command_on_an_avg_pool_vit_without_class_token(tmp_path, capsys):
    """The new user's command of issue 17, on a 6-block avg-pool ViT without a class token saved as safetensors."""
    torch.manual_seed(0)
    sizes = {"img_size": 32, "patch_size": 4, "embed_dim": 128, "depth": 6, "num_heads": 4}
    source = timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="avg", **sizes)
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    photos, _ = scenes_with_masks(tmp_path)
    main(
        [
            "inspect",
            "--model",
            "vit_tiny_patch16_224",
            "--checkpoint",
            str(tmp_path / "model.safetensors"),
            "--pretrained",
            "false",
            "--num_registers",
            "0",
            *(f"--{key}={value}" for key, value in sizes.items()),
            "--images",
            str(photos),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["class_token"] is False and stats["num_registers"] == 0 and stats["num_images"] == 8
    assert {f"artifacts/outlier_frac/block_{b:02d}" for b in range(6)} <= set(stats)
    assert stats["verdict"]["label"] in ("no outliers", "register-style", "not register-style")
    assert attention_columns(tmp_path / "out") == ["image", "patches"]  # the global query: the patches' attention
    assert "outlier fraction :" in capsys.readouterr().out


def test_inspect_a_siglip_model_with_registers_finds_planted_artifacts(tmp_path, capsys):
    model = plant_artifacts(tiny_vit(2, class_token=False, global_pool="map"), onset=1)
    path = tmp_path / "siglip.safetensors"
    save_file(model.state_dict(), str(path))
    photos, masks = scenes_with_masks(tmp_path)
    np.savez(tmp_path / "masks.npz", masks=np.stack(masks))
    main(
        [
            "inspect",
            "--model",
            "vit_base_patch16_siglip_224",
            "--checkpoint",
            str(path),
            "--num_registers",
            "2",
            *SIZE_ARGS,
            "--images",
            str(photos),
            "--masks",
            str(tmp_path / "masks.npz"),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["class_token"] is False and stats["verdict"]["label"] == "register-style"
    assert stats["artifacts/outlier_onset_block"] == 1 and "artifacts/patch_register_attention" in stats
    assert attention_columns(tmp_path / "out") == ["image", "attn pool", "reg 1", "reg 2"]
    assert "verdict          : register-style artifacts" in capsys.readouterr().out


# --- register interventions: what moved -------------------------------------------------------------


def test_an_intervention_shows_what_moved_before_and_after(tmp_path, capsys):
    inspect(tmp_path, weights(tmp_path, planted=True), "--register_intervention", "zero")
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["register_intervention"] == "zero" and stats["intervention_from_block"] == 0
    assert stats["test_registers"] is None and "intervention_reference" not in stats
    for key in ("outlier_frac", "norm_max_over_median", "patch_norm_median", "register_norm_mean"):
        assert f"artifacts/{key}" in stats and f"intervened/artifacts/{key}" in stats
    assert stats["intervened/artifacts/register_norm_mean"] != stats["artifacts/register_norm_mean"]
    before, after = (["CLS before", "reg 1 before", "reg 2 before"], ["CLS after", "reg 1 after", "reg 2 after"])
    assert attention_columns(out) == ["image", *before, *after]
    assert "intervention     : registers zero; last block before -> after" in printed
    assert f"outlier frac.  : {stats['artifacts/outlier_frac']:.2%} -> " in printed


def test_mean_takes_its_statistics_from_other_images_and_says_which(tmp_path, capsys):
    photos, _ = scenes_with_masks(tmp_path, count=6)
    checkpoint = weights(tmp_path, planted=True)
    flags = ["--register_intervention", "mean", "--test_registers", "1", "--intervention_images", "8"]
    inspect(tmp_path, checkpoint, *flags, "--num_images", "4", "--images", str(photos))
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["num_images"] == 4 and stats["test_registers"] == 1
    reference = {"images": str(photos), "files": "sorted paths 5..6", "num_images": 2}
    assert stats["intervention_reference"] == reference
    assert attention_columns(tmp_path / "out")[-2:] == ["CLS after", "reg 1 after"]
    inspect(tmp_path, checkpoint, *flags)
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["intervention_reference"] == {"images": "synthetic", "split": "train", "seed": 0, "num_images": 8}
    assert "K=1 test registers, registers mean" in capsys.readouterr().out


def test_all_test_registers_is_the_plain_inspection_exactly(tmp_path):
    checkpoint = weights(tmp_path, planted=True)
    inspect(tmp_path, checkpoint)
    plain = json.loads((tmp_path / "out" / "stats.json").read_text())
    inspect(tmp_path, checkpoint, "--test_registers", "2")
    kept = json.loads((tmp_path / "out" / "stats.json").read_text())
    measured = [key for key in plain if key.startswith("artifacts/")]
    assert len(measured) > 20
    assert {key: kept[key] for key in measured} == {key: plain[key] for key in measured}
    assert {key: kept[f"intervened/{key}"] for key in measured} == {key: plain[key] for key in measured}
    assert kept["verdict"] == plain["verdict"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--test_registers", "3"], "between 0 and the model's 2 registers, got 3"),
        (["--test_registers", "-1"], "between 0 and the model's 2 registers, got -1"),
        (["--num_registers", "0", "--register_intervention", "zero"], "needs a model with registers"),
        (["--register_intervention", "noise", "--intervention_from_block", "4"], "between 0 and 3"),
        (["--register_intervention", "mean", "--images", "{photos}"], "has none after its first 2"),
        (["--register_intervention", "shuffle", "--num_images", "1"], "inspect measures 1 image"),
        (["--test_registers", "1", "--find_register_neurons", "true"], "cannot go with a test-time register"),
    ],
)
def test_bad_interventions_are_refused_in_one_line_before_any_image_is_measured(
    tmp_path, capsys, monkeypatch, flags, message
):
    checkpoint = weights(tmp_path, planted=False)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 32)).save(photos / name)

    def no_scan(*_args, **_kwargs):
        raise AssertionError("an image was measured")

    monkeypatch.setattr("regablate.artifacts.scan.scan", no_scan)
    with pytest.raises(SystemExit) as exit_info:
        inspect(tmp_path, checkpoint, *(flag.format(photos=photos) for flag in flags))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]
    assert not (tmp_path / "out").exists()
