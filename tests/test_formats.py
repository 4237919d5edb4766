import pytest
import torch
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from regablate.cli import main
from regablate.errors import RegablateError
from regablate.models import load_backbone

SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 2, "image_size": 28}
SIZES["patch_size"] = 14


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


def test_inspect_runs_on_a_hf_folder(tmp_path):
    config = Dinov2WithRegistersConfig(num_register_tokens=4, **SIZES)
    Dinov2WithRegistersModel(config).save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    main(["inspect", "--checkpoint", str(tmp_path / "hf"), "--num_images", "4", "--output", str(out)])
    assert (out / "stats.json").is_file()


def test_hf_folder_refuses_model_and_registers(tmp_path):
    Dinov2Model(Dinov2Config(**SIZES)).save_pretrained(tmp_path)
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--checkpoint", str(tmp_path), "--model", "vit_tiny_patch16_224", "--output", str(out)])
    assert exit_info.value.code == 2
    assert not out.exists()
