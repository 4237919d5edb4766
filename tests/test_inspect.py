"""`regablate inspect`: planted artifacts found, an untouched model cleared, bad input in one line."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from regablate.cli import main
from tests.planted import MODEL, SIZES, plant_artifacts, tiny_vit

SIZE_ARGS = [f"--{k}={v}" for k, v in SIZES.items()]


def weights(tmp_path: Path, planted: bool) -> Path:
    model = tiny_vit()
    if planted:
        plant_artifacts(model, onset=1)
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
    assert Image.open(out / "attention.png").size == (4 * 34 + 2, 8 * 34 + 2)
    assert "outlier fraction : 6.25%" in printed and "outliers start at: block 1 of 0-3" in printed
    assert "max/median norm" in printed and "verdict          : register-style artifacts" in printed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder left"


def test_inspect_clears_an_untouched_model_and_replaces_its_earlier_output(tmp_path, capsys):
    checkpoint = weights(tmp_path, planted=False)
    inspect(tmp_path, checkpoint)
    inspect(tmp_path, checkpoint, "--threshold", "absolute", "--threshold_value", "1000")
    printed = capsys.readouterr().out
    assert "verdict          : no artifacts" in printed and "outliers start at: no block" in printed
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["threshold"] == "absolute"


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
