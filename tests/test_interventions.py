"""Register interventions at inference: fewer test-time registers, registers replaced by zero/mean/noise/shuffle."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from regablate.cli import main
from regablate.errors import RegablateError
from regablate.models import build_backbone, extract_features
from regablate.models.interventions import Intervention, intervened, register_statistics
from tests.conftest import TINY, TINY_MODEL

REGISTERS = 4


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    built = build_backbone(TINY_MODEL, REGISTERS, **TINY).eval()
    with torch.no_grad():
        built.reg_token.normal_()
    return built


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_all_registers_is_the_plain_model_bit_for_bit(model, images):
    plain = model.forward_features(images)
    with intervened(model, Intervention(test_registers=REGISTERS)):
        assert torch.equal(model.forward_features(images), plain)


@torch.no_grad()
def test_zero_test_registers_equals_the_weights_converted_to_no_registers(tmp_path, model, images):
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), path)
    converted = build_backbone(TINY_MODEL, 0, checkpoint=path, **TINY).eval()
    with intervened(model, Intervention(test_registers=0)):
        tokens = model.forward_features(images)
        assert torch.equal(tokens, converted.forward_features(images))
        assert torch.equal(model(images), converted(images))
        features = extract_features(model, images, blocks=[1])
    assert features.registers.shape[1] == 0
    assert model.num_reg_tokens == REGISTERS and model.forward_features(images).shape[1] == tokens.shape[1] + REGISTERS


@torch.no_grad()
def test_shuffle_swaps_registers_between_images(model, images):
    pair = images[:2]
    regs_in: list[torch.Tensor] = []

    def record(_module, args):
        regs_in.append(args[0][:, 1 : 1 + REGISTERS])

    handle = model.blocks[1].register_forward_pre_hook(record)
    model.forward_features(pair)
    handle.remove()
    with intervened(model, Intervention(kind="shuffle", from_block=1)):
        # Registered after the intervention's hook, so it sees block 1's replaced input.
        handle = model.blocks[1].register_forward_pre_hook(record)
        model.forward_features(pair)
    handle.remove()
    plain, shuffled = regs_in
    assert not torch.equal(plain[0], plain[1])
    assert torch.equal(shuffled[0], plain[1]) and torch.equal(shuffled[1], plain[0])


@torch.no_grad()
def test_mean_and_noise_use_the_stored_statistics(model, images):
    intervention = Intervention(kind="mean", from_block=1, test_registers=2)
    stats = register_statistics(model, [images[:2], images[2:]], intervention)
    assert stats.mean.shape == (len(model.blocks) - 1, 2, model.embed_dim)
    planted = type(stats)(1, torch.zeros_like(stats.mean), torch.zeros_like(stats.std))

    def registers_at_block_1(kind: str, statistics) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        with intervened(model, Intervention(kind=kind, from_block=1, test_registers=2), statistics):
            handle = model.blocks[1].register_forward_pre_hook(lambda _m, args: seen.append(args[0][:, 1:3]))
            model.forward_features(images)
        handle.remove()
        return seen[0]

    mean = stats.mean[0].expand(3, -1, -1)
    assert torch.equal(registers_at_block_1("mean", stats), mean)
    assert torch.equal(registers_at_block_1("noise", planted), torch.zeros_like(mean))
    noisy = registers_at_block_1("noise", stats)
    assert not torch.equal(noisy, mean)
    assert torch.equal(noisy, registers_at_block_1("noise", stats))  # seeded


@pytest.mark.parametrize(
    ("intervention", "registers", "message"),
    [
        (Intervention(test_registers=5), 4, "between 0 and the model's 4 registers"),
        (Intervention(test_registers=-1), 4, "between 0 and the model's 4 registers"),
        (Intervention(kind="zero"), 0, "needs a model with registers"),
        (Intervention(kind="zero", from_block=99), 4, "intervention_from_block must be between"),
        (Intervention(kind="mean"), 4, "needs the reference split"),
    ],
)
def test_bad_input_is_refused_in_one_line(images, intervention, registers, message):
    model = build_backbone(TINY_MODEL, registers, **TINY).eval()
    with pytest.raises(RegablateError, match=message), intervened(model, intervention):
        model.forward_features(images)


RANDOM_MODEL = ["--model", TINY_MODEL, "--pretrained", "false", "--num_registers", "2", "--img_size", "32"]
RANDOM_MODEL += ["--patch_size", "4", "--embed_dim", "32", "--depth", "2", "--num_heads", "2"]
PROBE_DATA = ["--data.img_size", "32", "--data.train_size", "64", "--data.val_size", "32", "--data.test_size", "32"]
PROBE_FAST = ["--probe.fast.batch_size", "32", "--probe.fast.cls_steps", "20", "--probe.fast.seg_steps", "20"]
PROBE_FAST += ["--probe.fast.depth_steps", "20"]


def test_probe_records_the_intervention_apart_from_the_plain_model(tmp_path):
    out = tmp_path / "probe"
    args = ["probe", *RANDOM_MODEL, *PROBE_DATA, *PROBE_FAST, "--output", str(out)]
    main([*args, "--register_intervention", "mean", "--test_registers", "1", "--intervention_images", "16"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["register_intervention"] == "mean" and summary["test_registers"] == 1
    assert summary["status"] == "complete"  # a row of the report of its own, beside the plain model's
    probe_json = json.loads((out / "probe.json").read_text())
    assert probe_json["source"]["register_intervention"] == "mean"
    intervened_store = probe_json["weights"]
    main(args)
    assert json.loads((out / "probe.json").read_text())["weights"] != intervened_store


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--test_registers", "3"], "between 0 and the model's 2 registers"),
        (["--intervention_from_block", "2", "--register_intervention", "zero"], "intervention_from_block"),
        (["--test_registers", "1", "--test_time_registers", "auto"], "cannot go with a test-time register"),
        (["--register_intervention", "shuffle", "--data.batch_size", "1"], "in batches of 1 leave one alone"),
        (["--register_intervention", "shuffle", "--data.train_size", "65"], "train split's 65 images in batches of 64"),
    ],
)
def test_probe_refuses_bad_interventions_before_extracting(tmp_path, capsys, flags, message):
    out = tmp_path / "probe"
    with pytest.raises(SystemExit) as exit_info:
        main(["probe", *RANDOM_MODEL, *PROBE_DATA, "--output", str(out), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not out.exists()


def test_the_report_puts_intervened_results_in_their_own_series():
    from regablate.report.tables import aggregate

    plain = {"run": "r2_s0", "num_registers": 2, "status": "complete", "probe/cls_top1": 0.5}
    zeroed = {**plain, "run": "r2_s0_zero", "register_intervention": "zero", "intervention_from_block": 0}
    fewer = {**plain, "run": "r2_s0_k1", "test_registers": 1}
    table = aggregate([plain, zeroed, fewer])
    assert len(table) == 3 and "registers zero" in table and "K=1 test registers" in table


def test_intervened_results_get_default_folders_of_their_own():
    from regablate.commands import RegisterIntervention

    assert RegisterIntervention().folder_suffix == ""
    assert RegisterIntervention("zero").folder_suffix == "_zero"
    shuffled = RegisterIntervention("shuffle", intervention_from_block=1, test_registers=2)
    assert shuffled.folder_suffix == "_k2_shuffle_b1"
