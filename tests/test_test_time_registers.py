"""Test-time registers on a tiny ViT with planted register neurons: found exactly, applied per image, plumbed."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import regablate.artifacts.register_neurons as ttr
from regablate.artifacts.scan import scan
from regablate.cli import main
from regablate.errors import RegablateError
from regablate.models import build_backbone, extract_features
from tests.conftest import tiny_fit_args
from tests.planted import CORNERS, MODEL, SIZES, plant_artifacts, tiny_vit

# Three units of block 1 fire on the planted (corner) patches and write their high norm.
PLANTED = {(1, 3), (1, 17), (1, 90)}
# Tokens that were not outliers may move by this much (relative L2), in every block: the extra token
# is one more key in attention, and the attention sink of the last block moves into it.
TOLERANCE = 0.01
SIZE_ARGS = [f"--{k}={v}" for k, v in SIZES.items()]


def planted_model(registers: int = 2) -> torch.nn.Module:
    return plant_artifacts(tiny_vit(registers), onset=1, units=tuple(u for _, u in sorted(PLANTED))).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def neurons(images) -> ttr.RegisterNeurons:
    return ttr.find_register_neurons(planted_model(), images, ttr.NeuronSearch(top_k=3), model_name="planted")


def test_the_finder_recovers_exactly_the_planted_units(images, neurons):
    assert set(neurons.units) == PLANTED and neurons.outlier_fraction == pytest.approx(len(CORNERS) / 64)
    wider = ttr.find_register_neurons(planted_model(), images, ttr.NeuronSearch(top_k=4, max_block=2))
    assert set(wider.units[:3]) == PLANTED and wider.scores[3] < 0.05 * wider.scores[2]
    only_block_0 = ttr.find_register_neurons(planted_model(), images, ttr.NeuronSearch(top_k=3, max_block=0))
    assert {block for block, _ in only_block_0.units} == {0}


def test_the_register_takes_the_outliers_and_leaves_the_other_tokens(images, neurons):
    model = planted_model()
    with torch.no_grad():
        before = extract_features(model, images, blocks=range(4))
        assert scan(model, images).stats["artifacts/outlier_frac/block_01"] == pytest.approx(len(CORNERS) / 64)
        ttr.add_test_time_register(model, neurons)
        after = extract_features(model, images, blocks=range(4))
        fractions = scan(model, images).stats
    assert (model.num_reg_tokens, model.num_prefix_tokens) == (2, 4)  # [CLS, REG, REG, TTR, PATCHES]
    assert after.patches.shape == before.patches.shape and after.registers.shape[1] == 3
    assert all(fractions[f"artifacts/outlier_frac/block_{b:02d}"] == 0.0 for b in range(4))
    ordinary = [i for i in range(64) if i not in CORNERS]
    for block in range(4):
        old, new = before.blocks[block][:, 3:][:, ordinary], after.blocks[block][:, 4:][:, ordinary]
        assert ((new - old).norm(dim=-1) / old.norm(dim=-1)).max() < TOLERANCE, block
    last = after.blocks[3]
    assert (last[:, 3].norm(dim=-1) > 20 * last[:, 4:].norm(dim=-1).median()).all(), "the extra token holds the norm"
    ttr.remove_test_time_register(model)
    with torch.no_grad():
        assert torch.equal(extract_features(model, images).patches, before.patches)


def test_a_batch_gives_what_one_image_at_a_time_gives(images, neurons):
    model = ttr.add_test_time_register(planted_model(), neurons)
    with torch.no_grad():
        batched = extract_features(model, images, blocks=[1, 3])
        single = [extract_features(model, image[None], blocks=[1, 3]) for image in images]
    for name in ("cls", "registers", "patches"):
        torch.testing.assert_close(
            getattr(batched, name), torch.cat([getattr(s, name) for s in single]), atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(batched.blocks[3], torch.cat([s.blocks[3] for s in single]), atol=1e-4, rtol=1e-5)


def test_a_json_found_on_the_same_weights_adds_it_after_loading(tmp_path, images, neurons):
    weights = tmp_path / "planted.safetensors"
    save_file(planted_model().state_dict(), str(weights))
    path = neurons.save(tmp_path / ttr.NEURONS_FILE)
    # Found with 2 registers at 32 px: the blocks are the same with 0 registers at 64 px.
    model = ttr.add_test_time_register(
        build_backbone(MODEL, 0, checkpoint=weights, **{**SIZES, "img_size": 64}), path
    ).eval()
    assert model.num_prefix_tokens == 2 and model.state_dict()["test_time_register.units"].tolist() == [
        list(u) for u in neurons.units
    ]
    big = torch.nn.functional.interpolate(images, scale_factor=2)
    assert scan(model, big).stats["artifacts/outlier_frac"] == 0.0
    # A checkpoint saved with the register converts like any other (the register is added after loading).
    saved = tmp_path / "with_ttr.pt"
    torch.save(model.state_dict(), saved)
    assert not hasattr(build_backbone(MODEL, 4, checkpoint=saved, **SIZES), ttr.ATTRIBUTE)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "register neurons file not found"),
        ("other-model", "were found on other weights"),
        ("unit", "unit 9999 of block 1 is out of range (its MLP has 128 units)"),
        ("block", "block 7 is out of range for a ViT with 4 blocks"),
        ("not-json", "is not a register neurons file"),
    ],
)
def test_bad_register_neurons_are_one_line_errors(tmp_path, neurons, case, message):
    path = neurons.save(tmp_path / ttr.NEURONS_FILE)
    data = json.loads(path.read_text())
    model = planted_model()
    if case == "missing":
        path = tmp_path / "nothing.json"
    elif case == "other-model":
        model = plant_artifacts(tiny_vit(seed=1), units=(3, 17, 90))
    elif case in ("unit", "block"):
        data["units"][0] = [1, 9999] if case == "unit" else [7, 0]
        path.write_text(json.dumps(data))
    else:
        path.write_text("{units: oops")
    with pytest.raises(RegablateError) as error:
        ttr.add_test_time_register(model, path)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not hasattr(model, ttr.ATTRIBUTE) and model.num_prefix_tokens == 3


def test_inspect_finds_writes_prints_and_applies_them(tmp_path, capsys):
    weights = tmp_path / "planted.safetensors"
    save_file(planted_model().state_dict(), str(weights))
    common = [
        "inspect",
        "--model",
        MODEL,
        "--checkpoint",
        str(weights),
        "--num_registers",
        "2",
        *SIZE_ARGS,
        "--num_images",
        "8",
    ]
    main(
        [
            *common,
            "--output",
            str(tmp_path / "found"),
            "--find_register_neurons",
            "true",
            "--register_neurons.top_k",
            "3",
            "--register_intervention",
            "zero",
        ]
    )
    printed = capsys.readouterr().out
    found = ttr.RegisterNeurons.load(tmp_path / "found" / ttr.NEURONS_FILE)
    assert set(found.units) == PLANTED and "register neurons : block:unit" in printed and "1:90" in printed
    assert "outlier fraction 0.00% in the last block with one test-time register" in printed
    stats = json.loads((tmp_path / "found" / "stats.json").read_text())
    assert stats["artifacts/outlier_frac"] > 0.05 and stats["test_time_registers/outlier_frac"] == 0.0
    regs = ["CLS {0}", "reg 1 {0}", "reg 2 {0}"]  # scanned before the search adds the test-time register
    columns = ["image", *(c.format("before") for c in regs), *(c.format("after") for c in regs)]
    assert Image.open(tmp_path / "found" / "attention.png").text["Columns"] == " | ".join(columns)

    main(
        [
            *common,
            "--output",
            str(tmp_path / "applied"),
            "--test_time_registers",
            str(tmp_path / "found" / ttr.NEURONS_FILE),
            "--register_intervention",
            "zero",
        ]
    )
    titles = Image.open(tmp_path / "applied" / "attention.png").text["Columns"]
    assert titles.endswith("reg 2 after | test-time reg after")
    stats = json.loads((tmp_path / "applied" / "stats.json").read_text())
    assert stats["artifacts/outlier_frac"] == 0.0 and stats["test_time_registers"] == 1 and stats["num_registers"] == 2
    assert "verdict          : no artifacts" in capsys.readouterr().out

    with pytest.raises(SystemExit):
        main(
            [
                *common,
                "--output",
                str(tmp_path / "both"),
                "--find_register_neurons",
                "true",
                "--test_time_registers",
                "x.json",
            ]
        )
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "not both" in error[0] and not (tmp_path / "both").exists()


PROBE_FAST = [
    "--data.img_size",
    "32",
    "--data.train_size",
    "64",
    "--data.val_size",
    "32",
    "--data.test_size",
    "32",
    "--probe.probes",
    "[cls]",
    "--probe.fast.lrs",
    "[0.1]",
    "--probe.fast.cls_steps",
    "20",
]


def test_probe_with_auto_finds_them_on_its_own_backbone_and_labels_the_results(tmp_path, capsys):
    weights = tmp_path / "planted.safetensors"
    save_file(planted_model().state_dict(), str(weights))
    out = tmp_path / "probe"
    sizes = json.dumps({k: v for k, v in SIZES.items() if k != "img_size"})
    common = ["probe", "--model", MODEL, "--checkpoint", str(weights), "--num_registers", "2", "--model_kwargs", sizes]
    main([*common, "--output", str(out), *PROBE_FAST])
    main([*common, "--output", str(out), "--test_time_registers", "auto", "--register_neurons.top_k", "3", *PROBE_FAST])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_time_registers"] == 1 and summary["test_time_registers/num_units"] == 3
    assert summary["num_registers"] == 2 and summary["artifacts/outlier_frac"] == 0.0 and "probe/cls_top1" in summary
    assert set(ttr.RegisterNeurons.load(out / ttr.NEURONS_FILE).units) == PLANTED
    assert len(list((out / "probe_cache").iterdir())) == 2, "features with and without the register are cached apart"
    assert "test-time register: 3 register neurons; 0.00% outliers left" in capsys.readouterr().out


def test_probe_of_a_run_writes_beside_it_and_keeps_its_seed(tmp_path, capsys):
    main(["fit", *tiny_fit_args(tmp_path, registers=0)])
    run = tmp_path / "runs" / "tiny" / "r0_s0"
    main(["probe", str(run), "--test_time_registers", "auto", *PROBE_FAST])
    summary = json.loads((tmp_path / "runs" / "tiny" / "r0_s0_ttr" / "summary.json").read_text())
    assert (summary["num_registers"], summary["seed"], summary["test_time_registers"]) == (0, 0, 1)
    assert "probe/cls_top1" in summary and "probe/cls_top1" not in json.loads((run / "summary.json").read_text())
    # A random tiny model has no outliers, so the register holds no neurons (and says so).
    assert summary["test_time_registers/num_units"] == 0
