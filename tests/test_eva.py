"""timm's Eva family (DINOv3, RoPE ViTs) as regablate backbones: exact at the model's own R, any R' by conversion."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

from regablate.errors import RegablateError
from regablate.models.backbone import build_backbone, extract_features
from regablate.models.layout import TokenLayout

# (timm name, its own register count, whether it has a class token, tiny sizes timm accepts)
EVA_MODELS = [
    ("vit_small_patch16_dinov3", 4, True, {"img_size": 64, "depth": 2}),
    ("vit_base_patch16_rope_reg1_gap_256", 1, False, {"img_size": 64, "depth": 2, "embed_dim": 96, "num_heads": 2}),
]


@pytest.fixture(params=EVA_MODELS, ids=[m[0] for m in EVA_MODELS])
def eva_checkpoint(request, tmp_path):
    name, registers, has_cls, kwargs = request.param
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    path = tmp_path / "eva.safetensors"
    save_file(reference.state_dict(), str(path))
    return name, registers, has_cls, kwargs, reference, path


def test_own_register_count_is_timm_exactly(eva_checkpoint):
    name, registers, has_cls, kwargs, reference, path = eva_checkpoint
    model = build_backbone(name, registers, checkpoint=path, **kwargs).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        diff = (model.forward_features(images) - reference.forward_features(images)).abs().max().item()
    assert diff < 1e-5
    assert TokenLayout.of(model) == TokenLayout(has_cls=has_cls, num_registers=registers)


@pytest.mark.parametrize("target", [0, 8])
def test_converted_register_count(eva_checkpoint, target):
    name, registers, has_cls, kwargs, reference, path = eva_checkpoint
    model = build_backbone(name, target, checkpoint=path, **kwargs).eval()
    assert model.num_prefix_tokens == int(has_cls) + target
    if target:  # the model's own registers first, the new ones distinct from them
        torch.testing.assert_close(model.reg_token[:, :registers], reference.reg_token)
        assert not torch.equal(model.reg_token[:, registers], model.reg_token[:, 0])
    with torch.no_grad():
        features = extract_features(model, torch.randn(1, 3, 64, 64), blocks=[-1])
    assert features.registers.shape[1] == target
    assert features.patches.shape[1] == 16
    assert features.blocks[-1].shape[1] == int(has_cls) + target + 16


def test_rope_never_rotates_a_register():
    """EvaAttention leaves its num_prefix_tokens unrotated; regablate builds it with CLS + R' of them."""
    model = build_backbone("vit_small_patch16_dinov3", 8, img_size=64, depth=1)
    assert model.blocks[0].attn.num_prefix_tokens == model.num_prefix_tokens == 9


def test_register_count_argument_of_eva_is_refused():
    with pytest.raises(RegablateError, match="use num_registers"):
        build_backbone("vit_small_patch16_dinov3", 4, num_reg_tokens=2)


def test_other_families_are_refused_in_one_line():
    with pytest.raises(RegablateError, match="is not a Vision Transformer .*vit_small_patch16_dinov3"):
        build_backbone("resnet18", 0)


@pytest.mark.slow
def test_inspect_runs_on_dinov3(tmp_path):
    out = tmp_path / "inspect"
    command = [sys.executable, "-m", "regablate", "inspect", "--model", "vit_small_patch16_dinov3"]
    command += ["--pretrained", "false", "--num_images", "4", "--img_size", "112", "--output", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (out / "stats.json").is_file()


@pytest.mark.slow
def test_neither_family_exits_2_in_one_line(tmp_path):
    command = [sys.executable, "-m", "regablate", "inspect", "--model", "resnet18", "--pretrained", "false"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1


def test_eva02_position_rows_of_cls_are_folded_exactly(tmp_path):
    """EVA-02 has a learned position embedding with a CLS row; built on the patches only, it computes the same."""
    torch.manual_seed(0)
    reference = timm.create_model("eva02_small_patch14_224", num_classes=0, img_size=56, depth=2).eval()
    path = tmp_path / "eva02.safetensors"
    save_file(reference.state_dict(), str(path))
    model = build_backbone("eva02_small_patch14_224", 0, checkpoint=path, img_size=56, depth=2).eval()
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert (model.forward_features(images) - reference.forward_features(images)).abs().max().item() < 1e-5
    assert build_backbone("eva02_small_patch14_224", 4, checkpoint=path, img_size=56, depth=2).num_prefix_tokens == 5
