"""Register interventions at inference: fewer test-time registers, registers replaced by zero/mean/noise/shuffle."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

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
