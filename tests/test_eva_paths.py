"""timm's Eva family (DINOv3, RoPE ViTs) on every path a ViT takes: tasks, monitors, inspect, probes,
test-time registers, fewer registers at test time, LOST's keys. Tiny sizes, random weights."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import regablate.artifacts.register_neurons as ttr
from regablate.artifacts.settings import NeuronSearch
from regablate.cli import main
from regablate.models import build_backbone, extract_features
from regablate.models.interventions import Intervention, intervened
from regablate.probe import ViTExtractor
from regablate.runs import RunRecord
from tests.conftest import REPO, TINY, TINY_MODEL, write_source_checkpoint

DINOV3 = "vit_small_patch16_dinov3"  # [CLS, 4 registers, patches], RoPE on the patches, plain MLP
DINOV3_SWIGLU = "vit_small_plus_patch16_dinov3"  # the same with SwiGLU MLPs
ROPE_GAP = "vit_base_patch16_rope_reg1_gap_256"  # [1 register, patches]: no class token, fused qkv with biases
EVA_ARGS = ["--model", DINOV3, "--pretrained", "false", "--num_registers", "4"]
EVA_ARGS += [f"--{key}={value}" for key, value in TINY.items()]
MODEL_KWARGS = {key: value for key, value in TINY.items() if key != "img_size"}


def eva(name: str, registers: int, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_backbone(name, registers, **{**TINY, **kwargs}).eval()
    with torch.no_grad():
        if model.reg_token is not None:
            model.reg_token.normal_()  # registers that differ from each other and from zero
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("config", ["tiny", "tiny_dino", "tiny_distill"])
def test_each_task_fits_dinov3_and_the_monitors_measure_it(tmp_path, config):
    args = ["fit", "--config", str(REPO / "tests" / "configs" / f"{config}.yaml"), "--model.model_name", DINOV3]
    args += ["--model.model_kwargs", json.dumps(MODEL_KWARGS), "--model.num_registers", "4", "--data.img_size", "32"]
    args += ["--trainer.max_steps", "2", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    if config == "tiny_distill":  # the source: a DINOv3 at its own 4 registers
        source = write_source_checkpoint(tmp_path / "source.safetensors", DINOV3, 32, MODEL_KWARGS, 4)
        args += ["--model.checkpoint", str(source), "--model.teacher_registers", "4"]
    if config == "tiny":  # the outlier monitor and the attention maps, as configs/monitor.yaml adds them
        args += ["--config", str(REPO / "configs" / "monitor.yaml")]
    main(args)
    summary = RunRecord(next((tmp_path / config).iterdir())).read()
    assert summary["status"] == "complete"
    if config == "tiny":
        assert summary["artifacts/step"] == 2 and isinstance(summary["artifacts/outlier_frac/block_01"], float)


def test_inspect_gives_its_verdict_on_dinov3(tmp_path, capsys):
    out = tmp_path / "inspect"
    main(["inspect", *EVA_ARGS, "--num_images", "4", "--find_register_neurons", "true", "--output", str(out)])
    printed = capsys.readouterr().out
    assert "verdict" in printed and "registers" in printed
    stats = json.loads((out / "stats.json").read_text())
    assert "artifacts/outlier_frac" in json.dumps(stats)
    assert (out / "attention.png").is_file() and (out / "register_neurons.json").is_file()


@pytest.mark.parametrize(
    "flags",
    [
        ["--register_intervention", "mean", "--test_registers", "2", "--intervention_images", "16"]
        + ["--probe.fast.batch_size", "16", "--probe.fast.cls_steps", "5", "--probe.fast.seg_steps", "5"]
        + ["--probe.fast.depth_steps", "5"],
        ["--probe.protocol", "dinov2", "--probe.probes", "[cls]", "--probe.dinov2.cls_iterations", "3"]
        + ["--probe.dinov2.cls_n_last_blocks", "[1]", "--probe.dinov2.cls_batch_size", "16"],
    ],
    ids=["fast_intervened", "dinov2"],
)
def test_probe_runs_on_dinov3(tmp_path, flags):
    out = tmp_path / "probe"
    data = ["--data.img_size", "32", "--data.train_size", "32", "--data.val_size", "16", "--data.test_size", "16"]
    main(["probe", *EVA_ARGS, *data, *flags, "--output", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert isinstance(summary["probe/cls_top1"], float)
    if "dinov2" not in flags:
        assert isinstance(summary["probe/lost_corloc"], float) and summary["test_registers"] == 2


@pytest.mark.parametrize(("name", "registers", "has_cls"), [(DINOV3, 4, True), (ROPE_GAP, 1, False)])
@torch.no_grad()
def test_fewer_test_registers_compute_what_the_converted_model_computes(tmp_path, images, name, registers, has_cls):
    model = eva(name, registers)
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), path)
    plain = model.forward_features(images)
    for kept in range(registers):
        converted = build_backbone(name, kept, checkpoint=path, **TINY).eval()
        with intervened(model, Intervention(test_registers=kept)):
            assert [block.attn.num_prefix_tokens for block in model.blocks] == [int(has_cls) + kept] * 2
            torch.testing.assert_close(model.forward_features(images), converted.forward_features(images))
        if kept:  # a kept register replaced, behind its RoPE-free prefix
            with intervened(model, Intervention(kind="zero", test_registers=kept)):
                assert model.forward_features(images).shape == converted.forward_features(images).shape
    assert torch.equal(model.forward_features(images), plain)  # every count restored
    assert model.blocks[0].attn.num_prefix_tokens == int(has_cls) + registers


@pytest.mark.parametrize("name", [DINOV3, DINOV3_SWIGLU])
@torch.no_grad()
def test_a_test_time_register_on_eva_mlps_is_never_rotated_and_takes_the_units(images, name):
    model = eva(name, 4)
    before = extract_features(model, images)
    found = ttr.find_register_neurons(model, images, NeuronSearch(threshold="percentile", top_k=4))
    units = ((0, 1), (1, 2), (1, 5))
    neurons = ttr.RegisterNeurons(units, (1.0,) * 3, ttr.blocks_fingerprint(model), NeuronSearch(), 0.0)
    seen = {}
    handle = model.blocks[1].mlp.fc2.register_forward_hook(lambda m, inputs, out: seen.update(hidden=inputs[0]))
    ttr.add_test_time_register(model, neurons)
    try:
        after = extract_features(model, images, blocks=[1])
    finally:
        handle.remove()
    assert model.num_prefix_tokens == 6 and [b.attn.num_prefix_tokens for b in model.blocks] == [6, 6]
    assert after.registers.shape[1] == 5 and after.patches.shape == before.patches.shape
    hidden = seen["hidden"]  # block 1's MLP hidden units: [CLS, 4 REG, TTR, PATCHES]
    assert (hidden[:, 6:, [2, 5]] == 0).all() and (hidden[:, 5, [2, 5]] != 0).all()
    ttr.remove_test_time_register(model)
    assert torch.equal(extract_features(model, images).patches, before.patches)
    assert len(found.units) == 4 and model.blocks[0].attn.num_prefix_tokens == 5


@pytest.mark.parametrize("name", [TINY_MODEL, ROPE_GAP])
@torch.no_grad()
def test_lost_reads_the_last_blocks_keys_of_either_family(images, name):
    model = eva(name, 1)
    attn = model.blocks[-1].attn
    if getattr(attn, "q_bias", None) is not None:
        attn.q_bias.normal_(), attn.v_bias.normal_()  # Eva's separate qkv biases (timm keeps k_bias zero)
    block_input = {}
    model.blocks[-1].register_forward_pre_hook(lambda m, args: block_input.update(x=args[0]))
    keys = ViTExtractor(model)(images).keys
    normed = model.blocks[-1].norm1(block_input["x"])
    bias = None if getattr(attn, "q_bias", None) is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    expected = F.linear(normed, attn.qkv.weight, attn.qkv.bias if bias is None else bias)
    dim = model.embed_dim
    expected = expected[:, model.num_prefix_tokens :, dim : 2 * dim].reshape(keys.shape)
    torch.testing.assert_close(keys, expected)
