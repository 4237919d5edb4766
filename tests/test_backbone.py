"""Register backbones: layout, conversion between register counts, checkpoint formats, errors."""

from __future__ import annotations

import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

from regablate.errors import RegablateError
from regablate.models import (
    TokenLayout,
    build_backbone,
    convert_state_dict,
    extract_features,
    global_feature_name,
    load_state_dict_file,
)
from tests.conftest import TINY, TINY_MODEL

REGISTER_COUNTS = [0, 1, 2, 4, 8, 16]


def source_model(embed_class: bool, registers: int = 0, **overrides) -> torch.nn.Module:
    """A tiny timm ViT as another library would train it (either position-embedding layout)."""
    torch.manual_seed(1)
    model = timm.create_model(
        TINY_MODEL, num_classes=0, reg_tokens=registers, no_embed_class=not embed_class, **{**TINY, **overrides}
    )
    # Non-trivial tokens and position embedding, so that folding mistakes would show.
    with torch.no_grad():
        model.cls_token.normal_()
        model.pos_embed.normal_()
        if registers:
            model.reg_token.normal_()
    return model.eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("embed_class", [True, False])
def test_zero_registers_reproduces_source_exactly(tmp_path, images, embed_class):
    source = source_model(embed_class)
    path = tmp_path / "source.safetensors"
    save_file(source.state_dict(), path)
    converted = build_backbone(TINY_MODEL, 0, checkpoint=path, **TINY).eval()
    assert converted.no_embed_class and converted.pos_embed.shape[1] == 64
    with torch.no_grad():
        assert torch.equal(converted.forward_features(images), source.forward_features(images))
        assert torch.equal(converted(images), source(images))


@pytest.mark.parametrize("registers", REGISTER_COUNTS)
def test_layout_for_each_register_count(images, registers):
    model = build_backbone(TINY_MODEL, registers, **TINY).eval()
    assert model.num_reg_tokens == registers
    assert model.num_prefix_tokens == 1 + registers
    assert model.pos_embed.shape == (1, 64, 32), "only patches carry a position embedding"
    with torch.no_grad():
        features = extract_features(model, images, blocks=[0, -1])
        tokens = model.forward_features(images)
    assert features.cls.shape == (3, 32)
    assert features.registers.shape == (3, registers, 32)
    assert features.patches.shape == (3, 64, 32)
    assert set(features.blocks) == {0, -1}
    assert features.blocks[0].shape == (3, 1 + registers + 64, 32)
    # Layout [CLS, REG.., PATCHES] of the final tokens.
    torch.testing.assert_close(tokens[:, 0], features.cls)
    torch.testing.assert_close(tokens[:, 1 : 1 + registers], features.registers)
    torch.testing.assert_close(tokens[:, 1 + registers :], features.patches)
    # Blocks are the residual stream before the final norm: the final norm of the last block is the output.
    torch.testing.assert_close(model.norm(features.blocks[-1]), tokens)
    assert not torch.allclose(features.blocks[-1], tokens)


def test_blocks_match_a_manual_forward(images):
    model = build_backbone(TINY_MODEL, 4, **TINY).eval()
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        after_first = model.blocks[0](x)
        features = extract_features(model, images, blocks=[0])
    torch.testing.assert_close(features.blocks[0], after_first)


@pytest.mark.parametrize("source_registers", [0, 2])
def test_new_registers_differ_and_existing_are_copied(tmp_path, source_registers):
    source = source_model(embed_class=False, registers=source_registers)
    path = tmp_path / "source.pt"
    torch.save(source.state_dict(), path)
    model = build_backbone(TINY_MODEL, 8, checkpoint=path, **TINY)
    regs = model.reg_token[0]
    if source_registers:
        torch.testing.assert_close(regs[:source_registers], source.reg_token[0])
    distances = torch.cdist(regs, regs) + torch.eye(8) * 1e9
    assert distances.min() > 1e-3, "registers must not start identical"
    new = regs[source_registers:]
    assert 0.005 < new.std() < 0.05, "new registers start from a small random normal"


def test_embed_class_registers_fold_their_position_rows(tmp_path, images):
    source = source_model(embed_class=True, registers=2)
    path = tmp_path / "source.pth"
    torch.save({"model": source.state_dict()}, path)
    converted = build_backbone(TINY_MODEL, 2, checkpoint=path, **TINY).eval()
    torch.testing.assert_close(converted.reg_token, source.reg_token + source.pos_embed[:, 1:3])
    with torch.no_grad():
        torch.testing.assert_close(converted.forward_features(images), source.forward_features(images))


def test_fewer_registers_keep_the_first_ones(tmp_path):
    source = source_model(embed_class=False, registers=4)
    converted = convert_state_dict(source.state_dict(), build_backbone(TINY_MODEL, 1, **TINY))
    torch.testing.assert_close(converted["reg_token"], source.reg_token[:, :1])


def test_other_resolution_resamples_patch_position_embedding(tmp_path):
    source = source_model(embed_class=True, img_size=64)
    path = tmp_path / "source.safetensors"
    save_file(source.state_dict(), path)
    model = build_backbone(TINY_MODEL, 4, checkpoint=path, **TINY)
    assert model.pos_embed.shape == (1, 64, 32)
    torch.testing.assert_close(model.cls_token, source.cls_token + source.pos_embed[:, :1])


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".ckpt"])
def test_round_trip_through_every_format(tmp_path, images, suffix):
    model = build_backbone(TINY_MODEL, 4, **TINY).eval()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(model.state_dict(), path)
    elif suffix == ".ckpt":  # the shape of a Lightning checkpoint of a regablate task
        state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
        state["head.weight"] = torch.zeros(3, 32)
        torch.save({"state_dict": state, "epoch": 3, "hyper_parameters": {"num_registers": 4}}, path)
    else:
        torch.save(model.state_dict(), path)
    loaded = build_backbone(TINY_MODEL, 4, checkpoint=path, **TINY).eval()
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(images), model.forward_features(images))


def test_timm_test_model_builds():
    model = build_backbone("test_vit", 2)
    assert model.num_reg_tokens == 2


# --- bad input: one clear error each -------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 2.5, "4", True])
def test_bad_register_count(bad):
    with pytest.raises(RegablateError, match="num_registers must be an integer >= 0"):
        build_backbone(TINY_MODEL, bad, **TINY)


def test_unknown_model_suggests_close_names():
    with pytest.raises(RegablateError, match="unknown timm model 'vit_tiny_patch16_2244'.*vit_tiny_patch16_224"):
        build_backbone("vit_tiny_patch16_2244", 0)


def test_model_that_is_not_a_vit():
    with pytest.raises(RegablateError, match="resnet18 is not a Vision Transformer"):
        build_backbone("resnet18", 0)


def test_img_size_not_divisible_by_patch_size():
    with pytest.raises(RegablateError, match=r"img_size \(30, 30\).*patch size \(4, 4\)"):
        build_backbone(TINY_MODEL, 0, **{**TINY, "img_size": 30})


def test_layout_arguments_are_refused():
    with pytest.raises(RegablateError, match="use num_registers"):
        build_backbone(TINY_MODEL, 0, reg_tokens=4, **TINY)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(RegablateError, match="checkpoint not found: .*nope.safetensors"):
        build_backbone(TINY_MODEL, 0, checkpoint=tmp_path / "nope.safetensors", **TINY)


def test_checkpoint_with_wrong_shapes_names_the_tensor(tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file(source_model(embed_class=False, embed_dim=48, num_heads=2).state_dict(), path)
    with pytest.raises(
        RegablateError, match=r"checkpoint tensor \S+ has shape \(.*48.*\) but the model expects \(.*32.*\)"
    ):
        build_backbone(TINY_MODEL, 0, checkpoint=path, **TINY)


def test_checkpoint_with_other_depth(tmp_path):
    path = tmp_path / "deep.pt"
    torch.save(source_model(embed_class=False, depth=3).state_dict(), path)
    with pytest.raises(RegablateError, match="blocks.2.*no place in the model"):
        build_backbone(TINY_MODEL, 0, checkpoint=path, **TINY)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".ckpt"])
def test_corrupt_checkpoint(tmp_path, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(b"\x00\x01 definitely not a checkpoint" * 10)
    with pytest.raises(RegablateError, match="cannot read checkpoint"):
        load_state_dict_file(path)


class Payload:
    """Stands for arbitrary code in a pickle: it must never be unpickled."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_checkpoint_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with path.open("wb") as handle:
        pickle.dump({"cls_token": Payload()}, handle)
    with pytest.raises(RegablateError, match="cannot read checkpoint"):
        load_state_dict_file(path)
    assert "unpickled!" not in capsys.readouterr().out


def test_block_index_out_of_range(images):
    model = build_backbone(TINY_MODEL, 0, **TINY)
    with pytest.raises(RegablateError, match="block index 2 is out of range for a ViT with 2 blocks"):
        extract_features(model, images, blocks=[2])


# --- ViTs without a class token: avg-pooled ViTs and SigLIP (attention pool) ----------------------

NO_CLS_SOURCES = {
    # name: (timm model, timm arguments): what another library would have trained
    "avg+fc_norm": (TINY_MODEL, {"class_token": False, "global_pool": "avg"}),
    "avg": (TINY_MODEL, {"class_token": False, "global_pool": "avg", "fc_norm": False}),
    "siglip (map)": ("vit_base_patch16_siglip_224", {}),
    "siglip gap": ("vit_base_patch16_siglip_gap_224", {}),
}


def no_cls_source(name: str, registers: int = 0, embed_class: bool = True) -> torch.nn.Module:
    model_name, layout = NO_CLS_SOURCES[name]
    torch.manual_seed(2)
    model = timm.create_model(
        model_name, num_classes=0, reg_tokens=registers, no_embed_class=not embed_class, **TINY, **layout
    )
    with torch.no_grad():
        model.pos_embed.normal_()
        if registers:
            model.reg_token.normal_()
    return model.eval()


@pytest.mark.parametrize("name", NO_CLS_SOURCES)
def test_no_class_token_checkpoint_loads_under_any_vit_name_and_reproduces_it_exactly(tmp_path, images, name):
    source = no_cls_source(name)
    assert source.cls_token is None
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), path)
    # The weights decide the class token, the pooling and the norms: the name only gives the family.
    model = build_backbone(TINY_MODEL, 0, checkpoint=path, **TINY).eval()
    assert model.cls_token is None and model.global_pool == source.global_pool
    with torch.no_grad():
        features = extract_features(model, images, blocks=[0])
        assert torch.equal(model.forward_features(images), source.forward_features(images))
        assert torch.equal(features.pooled, source.forward_head(source.forward_features(images), pre_logits=True))
    assert features.cls is None and features.registers.shape == (3, 0, 32) and features.blocks[0].shape == (3, 64, 32)


@pytest.mark.parametrize("name", ["avg+fc_norm", "siglip (map)"])
@pytest.mark.parametrize("registers", [1, 4])
def test_no_class_token_layout_is_registers_then_patches(tmp_path, images, name, registers):
    path = tmp_path / "model.safetensors"
    save_file(no_cls_source(name).state_dict(), path)
    model = build_backbone(TINY_MODEL, registers, checkpoint=path, **TINY).eval()
    layout = TokenLayout.of(model)
    assert layout == TokenLayout(has_cls=False, num_registers=registers) and layout.num_prefix == registers
    assert model.pos_embed.shape == (1, 64, 32), "registers carry no position embedding"
    with torch.no_grad():
        tokens = model.forward_features(images)
        features = extract_features(model, images, blocks=[-1])
        # The global feature never sees a register: timm's pooling over the patch tokens only.
        patches_only = model.attn_pool(tokens[:, registers:]) if model.attn_pool is not None else None
    torch.testing.assert_close(features.registers, tokens[:, :registers])
    torch.testing.assert_close(features.patches, tokens[:, registers:])
    assert features.blocks[-1].shape == (3, registers + 64, 32)
    expected = patches_only if patches_only is not None else model.fc_norm(tokens[:, registers:].mean(dim=1))
    torch.testing.assert_close(features.pooled, expected)
    assert "patch tokens" in global_feature_name(model)


def test_registers_added_to_a_vit_without_class_token_fold_their_position_rows(tmp_path, images):
    source = no_cls_source("avg+fc_norm", registers=2, embed_class=True)  # the register rows are in pos_embed
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)
    same = build_backbone(TINY_MODEL, 2, checkpoint=path, **TINY).eval()
    torch.testing.assert_close(same.reg_token, source.reg_token + source.pos_embed[:, :2])
    with torch.no_grad():
        torch.testing.assert_close(same.forward_features(images), source.forward_features(images))
    more = build_backbone(TINY_MODEL, 6, checkpoint=path, **TINY)
    torch.testing.assert_close(more.reg_token[:, :2], same.reg_token)
    assert 0.005 < more.reg_token[0, 2:].std() < 0.05


def test_siglip_models_build_tiny_without_class_token():
    assert {"vit_base_patch16_siglip_224", "vit_so400m_patch14_siglip_224"} <= set(timm.list_models("*siglip*"))
    model = build_backbone("vit_base_patch16_siglip_224", 4, **TINY)
    assert model.cls_token is None and model.global_pool == "map" and model.num_prefix_tokens == 4
    avg = build_backbone(TINY_MODEL, 0, class_token=False, **TINY)  # from scratch: avg unless said otherwise
    assert avg.global_pool == "avg" and avg.cls_token is None


@pytest.mark.parametrize(
    "source, given, message",
    [
        ("avg+fc_norm", {"class_token": True}, "class_token=True contradicts the weights"),
        ("avg+fc_norm", {"global_pool": "map"}, "global_pool='map' contradicts the weights, which have no attention"),
        ("siglip (map)", {"global_pool": "avg"}, "contradicts the weights, which have an attention pool"),
    ],
)
def test_arguments_that_contradict_the_weights_fail(tmp_path, source, given, message):
    path = tmp_path / "model.safetensors"
    save_file(no_cls_source(source).state_dict(), path)
    with pytest.raises(RegablateError, match=message):
        build_backbone(TINY_MODEL, 0, checkpoint=path, **TINY, **given)


def test_pools_that_would_mix_registers_in_are_refused():
    with pytest.raises(RegablateError, match="'pool_include_prefix' cannot be set"):
        build_backbone(TINY_MODEL, 2, pool_include_prefix=True, **TINY)
    with pytest.raises(RegablateError, match="global_pool 'prr' is not supported"):
        build_backbone(TINY_MODEL, 2, global_pool="prr", **TINY)
    with pytest.raises(RegablateError, match="global_pool 'token' needs the class token"):
        build_backbone(TINY_MODEL, 2, class_token=False, global_pool="token", **TINY)


def test_a_class_token_checkpoint_loads_under_a_siglip_name(tmp_path, images):
    source = source_model(embed_class=True)
    path = tmp_path / "cls.safetensors"
    save_file(source.state_dict(), path)
    model = build_backbone("vit_base_patch16_siglip_224", 0, checkpoint=path, **TINY).eval()
    assert model.global_pool == "token" and model.attn_pool is None
    with torch.no_grad():
        assert torch.equal(extract_features(model, images).pooled, source.forward_features(images)[:, 0])


def test_probe_features_and_probe_json_of_a_vit_without_class_token(tmp_path, images):
    """The probes read the pooled feature where they read CLS, LOST the patch keys only, and probe.json says so."""
    import json

    from regablate.cli import main
    from regablate.probe.features import ViTExtractor

    torch.manual_seed(0)
    model = build_backbone("vit_base_patch16_siglip_224", 2, **TINY).eval()
    features = ViTExtractor(model)(images)
    with torch.no_grad():
        expected = extract_features(model, images)
    torch.testing.assert_close(features.cls, expected.pooled)
    torch.testing.assert_close(features.patches, expected.patches.reshape(3, 8, 8, 32))
    assert features.keys.shape == (3, 8, 8, 32), "LOST's keys are the patches' only, registers left out"
    path = tmp_path / "siglip.safetensors"
    save_file(model.state_dict(), path)
    sizes = [f"--{key}={value}" for key, value in TINY.items()]
    data = ["--data.train_size", "64", "--data.val_size", "32", "--data.test_size", "32", "--data.batch_size", "32"]
    steps = ["--probe.fast.cls_steps", "5", "--probe.fast.seg_steps", "5", "--probe.fast.depth_steps", "5"]
    steps += ["--probe.fast.batch_size", "32"]
    out = tmp_path / "probe"
    main(["probe", "--model", TINY_MODEL, "--checkpoint", str(path), *sizes, *data, *steps, "--output", str(out)])
    written = json.loads((out / "probe.json").read_text())
    assert written["source"]["class_token"] is False
    assert written["source"]["global_feature"] == "attention pool (attn_pool) over the patch tokens"
    assert {"probe/cls_top1", "probe/seg_miou", "probe/lost_corloc"} <= set(written["metrics"])
