import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
)

from regablate.cli import main
from regablate.errors import RegablateError
from regablate.models import load_backbone, resolve_backbone
from regablate.models.resolve import BackboneSource

SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 2, "image_size": 28}
SIZES["patch_size"] = 14
DINOV3_SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
DINOV3_SIZES |= {"image_size": 32, "patch_size": 8, "num_register_tokens": 4}


def saved_dinov3(folder, **config):
    """A tiny random DINOv3ViTModel saved to ``folder``, its biases, layer scales and tokens far from their init."""
    torch.manual_seed(0)
    reference = DINOv3ViTModel(DINOv3ViTConfig(**{**DINOV3_SIZES, **config})).eval()
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "bias" in name or "lambda1" in name or "token" in name:
                parameter.normal_(std=0.5)
    reference.save_pretrained(folder)
    return reference


@pytest.mark.parametrize(
    ("config", "model_class"),
    [
        (Dinov2Config(**SIZES), Dinov2Model),
        (Dinov2WithRegistersConfig(num_register_tokens=4, **SIZES), Dinov2WithRegistersModel),
    ],
)
@pytest.mark.parametrize("given", ["folder", "safetensors"])
def test_hf_folder_matches_transformers(tmp_path, config, model_class, given):
    torch.manual_seed(0)
    reference = model_class(config).eval()
    with torch.no_grad():  # random layer scale, so the blocks count
        for name, parameter in reference.named_parameters():
            if "lambda1" in name or "register_tokens" in name or "cls_token" in name:
                parameter.normal_()
    reference.save_pretrained(tmp_path)
    model = load_backbone(tmp_path if given == "folder" else tmp_path / "model.safetensors")
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = reference(pixel_values=images).last_hidden_state
        got = model.forward_features(images)
    assert model.num_prefix_tokens == 1 + getattr(config, "num_register_tokens", 0)
    assert (got - expected).abs().max() < 1e-4


def test_unsupported_hf_class_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["ViTModel"]}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(RegablateError, match="ViTModel; supported Hugging Face classes: Dinov2Model"):
        load_backbone(tmp_path)


def test_hf_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(RegablateError, match="no config.json"):
        load_backbone(tmp_path)


@pytest.mark.parametrize("kind", ["dinov2", "dinov3"])
def test_inspect_runs_on_a_hf_folder(tmp_path, kind):
    if kind == "dinov2":
        config = Dinov2WithRegistersConfig(num_register_tokens=4, **SIZES)
        Dinov2WithRegistersModel(config).save_pretrained(tmp_path / "hf")
    else:
        saved_dinov3(tmp_path / "hf")
    out = tmp_path / "out"
    argv = ["inspect", "--checkpoint", str(tmp_path / "hf"), "--num_images", "4", "--num_registers", "2"]
    main([*argv, "--output", str(out)])
    assert json.loads((out / "stats.json").read_text())["num_registers"] == 2


def test_hf_folder_refuses_model(tmp_path):
    Dinov2Model(Dinov2Config(**SIZES)).save_pretrained(tmp_path)
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--checkpoint", str(tmp_path), "--model", "vit_tiny_patch16_224", "--output", str(out)])
    assert exit_info.value.code == 2
    assert not out.exists()


@pytest.mark.parametrize(
    ("config", "timm_name"),
    [
        ({}, "vit_small_patch16_dinov3_qkvb"),  # Hugging Face's defaults: query and value bias, no key bias
        ({"use_gated_mlp": True, "hidden_act": "silu", "intermediate_size": 80}, "vit_small_plus_patch16_dinov3_qkvb"),
        (
            {"query_bias": False, "value_bias": False, "proj_bias": False, "mlp_bias": False, "num_register_tokens": 0},
            "vit_small_patch16_dinov3",
        ),
    ],
)
def test_dinov3_folder_matches_transformers(tmp_path, config, timm_name):
    reference = saved_dinov3(tmp_path, **config)
    resolved = resolve_backbone(BackboneSource(checkpoint=str(tmp_path / "model.safetensors")))
    model = resolved.model
    images = torch.randn(2, 3, 32, 48)  # not the config's size: RoPE follows the grid
    with torch.no_grad():
        expected = reference(pixel_values=images).last_hidden_state
        got = model.forward_features(images)
    assert model.num_prefix_tokens == 1 + reference.config.num_register_tokens
    assert (got - expected).abs().max() < 1e-4
    assert resolved.description["model_name"] == timm_name
    assert resolved.description["model_kwargs"]["embed_dim"] == 32
    assert resolved.description["global_feature"] == "cls"


def test_dinov3_folder_with_blocks_under_model(tmp_path):
    """Hugging Face folders keep DINOv3's blocks under ``layer.`` (hub) or ``model.layer.`` (the module's names)."""
    reference = saved_dinov3(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    save_file(
        {("model." if key.startswith("layer.") else "") + key: v for key, v in weights.items()},
        tmp_path / "model.safetensors",
    )
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        difference = load_backbone(tmp_path).forward_features(images) - reference(pixel_values=images).last_hidden_state
    assert difference.abs().max() < 1e-4


def test_dinov3_folder_converts_registers_and_size(tmp_path):
    reference = saved_dinov3(tmp_path)
    model = load_backbone(tmp_path, num_registers=8, img_size=64)
    assert model.num_prefix_tokens == 1 + 8
    assert tuple(model.patch_embed.img_size) == (64, 64)
    assert torch.equal(model.reg_token[:, :4], reference.embeddings.register_tokens)
    assert all(block.attn.num_prefix_tokens == 9 for block in model.blocks)  # registers are never rotated


def test_dinov2_folder_takes_img_size(tmp_path):
    Dinov2Model(Dinov2Config(**SIZES)).save_pretrained(tmp_path)
    resolved = resolve_backbone(BackboneSource(checkpoint=str(tmp_path), img_size=56))
    assert resolved.model.pos_embed.shape == (1, 16, 32)  # the 2x2 patch rows resampled by timm to 4x4
    assert resolved.description["img_size"] == [56, 56]
    assert resolved.description["model_name"] == "vit_small_patch14_dinov2"
    assert resolved.model.forward_features(torch.randn(1, 3, 56, 56)).shape == (1, 17, 32)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"key_bias": True}, "key_bias"),
        ({"layer_norm_eps": 1e-6}, "layer_norm_eps"),
        ({"hidden_act": "relu"}, "hidden_act"),
    ],
)
def test_dinov3_config_without_timm_equivalent_is_refused(tmp_path, config, field):
    saved_dinov3(tmp_path, **config)
    with pytest.raises(RegablateError, match=f"{field}=.* has no exact timm equivalent"):
        load_backbone(tmp_path)


def test_hf_folder_refuses_size_arguments(tmp_path):
    saved_dinov3(tmp_path)
    with pytest.raises(RegablateError, match="config.json gives embed_dim; leave them out"):
        resolve_backbone(BackboneSource(checkpoint=str(tmp_path), embed_dim=64))
