"""Checkpoints in the upstream repositories' layouts (facebookresearch/dinov2, facebookresearch/dinov3).

Each test writes the file itself: a random timm model, its tensors renamed to the upstream names
(as the upstream ``DinoVisionTransformer`` saves them), and checks that regablate's backbone
computes what the timm model computes.
"""

import pytest
import timm
import torch

from regablate.cli import main
from regablate.errors import RegablateError
from regablate.models import build_backbone

SIZES = {"embed_dim": 32, "depth": 2, "num_heads": 2}
FLAGS = ["--embed_dim", "32", "--depth", "2", "--num_heads", "2"]


def random_timm(name, **kwargs):
    """A timm model whose layer scales, biases and tokens are far from their init, so every tensor counts."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, **SIZES, **kwargs).eval()
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if "gamma" in key or "bias" in key or "token" in key or "pos_embed" in key:
                parameter.normal_(std=0.5)
    return model


def dinov2_layout(model, chunks=0):
    """A timm DINOv2 ViT's tensors as facebookresearch/dinov2 saves them: the class token's position row in
    ``pos_embed``, ``register_tokens``, ``mask_token``, and ``blocks.<chunk>.<index>.`` with ``block_chunks``."""
    state = dict(model.state_dict())
    dim = state["cls_token"].shape[-1]
    if "reg_token" in state:  # timm keeps no position row for CLS: give it one, taken back out of the token
        row = torch.randn(1, 1, dim)
        state["cls_token"] = state["cls_token"] - row
        state["pos_embed"] = torch.cat([row, state["pos_embed"]], dim=1)
        state["register_tokens"] = state.pop("reg_token")
    state["mask_token"] = torch.zeros(1, dim)
    if chunks:
        per_chunk = len(model.blocks) // chunks
        state = {
            (
                f"blocks.{int(key.split('.')[1]) // per_chunk}.{key[len('blocks.') :]}"
                if key.startswith("blocks.")
                else key
            ): v
            for key, v in state.items()
        }
    return state


def dinov3_layout(model):
    """A timm DINOv3 Eva's tensors as facebookresearch/dinov3 saves them: ``storage_tokens``,
    ``ls1.gamma``, one ``qkv.bias`` with its key part masked (``bias_mask``), SwiGLU's ``w1/w2/w3``,
    the RoPE ``periods`` (bfloat16) and ``mask_token``."""
    swiglu = {"fc1_g": "w1", "fc1_x": "w2", "fc2": "w3"} if hasattr(model.blocks[0].mlp, "fc1_g") else {}
    out = {}
    for key, value in model.state_dict().items():
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        for timm_name, upstream in swiglu.items():
            key = key.replace(f".mlp.{timm_name}.", f".mlp.{upstream}.")
        out[key] = value
    for index in range(len(model.blocks)):
        attn = f"blocks.{index}.attn."
        if attn + "q_bias" in out:
            query, value = out.pop(attn + "q_bias"), out.pop(attn + "v_bias")
            out[attn + "qkv.bias"] = torch.cat([query, torch.randn_like(query), value])  # the key part is masked
            out[attn + "qkv.bias_mask"] = torch.cat(
                [torch.ones_like(query), torch.zeros_like(query), torch.ones_like(query)]
            )
    out["rope_embed.periods"] = model.rope.periods.to(torch.bfloat16)
    out["mask_token"] = torch.zeros(1, model.embed_dim)
    return out


def same_forward(reference, model, img_size):
    images = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        return (model.forward_features(images) - reference.forward_features(images)).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("name", "chunks"),
    [("vit_small_patch14_reg4_dinov2", 0), ("vit_small_patch14_reg4_dinov2", 2), ("vit_small_patch14_dinov2", 0)],
)
def test_dinov2_checkpoint(tmp_path, name, chunks):
    reference = random_timm(name, img_size=28)
    path = tmp_path / "dinov2.pth"
    torch.save(dinov2_layout(reference, chunks), path)
    registers = reference.num_prefix_tokens - 1
    model = build_backbone(name, registers, checkpoint=path, img_size=28, **SIZES).eval()
    assert same_forward(reference, model, 28)


@pytest.mark.parametrize(
    "name", ["vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb", "vit_small_plus_patch16_dinov3_qkvb"]
)
def test_dinov3_checkpoint(tmp_path, name):
    reference = random_timm(name, img_size=32)
    path = tmp_path / "dinov3.pth"
    torch.save(dinov3_layout(reference), path)
    model = build_backbone(name, 4, checkpoint=path, img_size=32, **SIZES).eval()
    assert same_forward(reference, model, 32)
    converted = build_backbone(name, 8, checkpoint=path, img_size=32, **SIZES)
    assert converted.num_prefix_tokens == 1 + 8
    assert torch.equal(converted.reg_token[:, :4], reference.reg_token)


def test_dinov3_bias_without_a_place_is_refused(tmp_path):
    path = tmp_path / "dinov3.pth"
    torch.save(dinov3_layout(random_timm("vit_small_patch16_dinov3_qkvb", img_size=32)), path)
    with pytest.raises(RegablateError, match=r"qkv.bias is not zero .* pick the model's _qkvb variant"):
        build_backbone("vit_small_patch16_dinov3", 4, checkpoint=path, img_size=32, **SIZES)


def test_shapes_that_do_not_match_model(tmp_path, capsys):
    path = tmp_path / "dinov3.pth"
    torch.save(dinov3_layout(random_timm("vit_small_patch16_dinov3", img_size=32)), path)
    out = tmp_path / "out"
    argv = ["inspect", "--model", "vit_small_patch16_dinov3", "--checkpoint", str(path), "--embed_dim", "48"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--depth", "2", "--num_heads", "2", "--img_size", "32", "--output", str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    assert "patch_embed.proj.weight has shape (32, 3, 16, 16) but the model expects (48, 3, 16, 16)" in error[0]
    assert not out.exists()


class Payload:
    """Stands for arbitrary code in a pickle: it must never run."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_upstream_file_with_code_never_runs_it(tmp_path, capsys):
    state = dinov3_layout(random_timm("vit_small_patch16_dinov3", img_size=32))
    state["rope_embed.periods"] = Payload()
    path = tmp_path / "dinov3.pth"
    torch.save(state, path)
    with pytest.raises(RegablateError, match="holds objects other than tensors"):
        build_backbone("vit_small_patch16_dinov3", 4, checkpoint=path, img_size=32, **SIZES)
    assert "unpickled!" not in capsys.readouterr().out


def test_inspect_runs_on_an_upstream_checkpoint(tmp_path):
    path = tmp_path / "dinov3.pth"
    torch.save(dinov3_layout(random_timm("vit_small_patch16_dinov3", img_size=32)), path)
    out = tmp_path / "out"
    argv = ["inspect", "--model", "vit_small_patch16_dinov3", "--checkpoint", str(path), *FLAGS, "--img_size", "32"]
    main([*argv, "--num_images", "4", "--output", str(out)])
    assert (out / "stats.json").is_file()
