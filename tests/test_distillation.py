"""Post-hoc registers: views, targets, frozen parameters, and learning the teacher's features."""

from __future__ import annotations

import json

import pytest
import torch

from regablate.cli import main
from regablate.data import SyntheticScenes
from regablate.errors import RegablateError
from regablate.models import build_backbone, extract_features
from regablate.tasks import Distillation
from regablate.tasks.distillation import apply_view, undo_view, view_transforms
from tests.conftest import REPO, TINY_MODEL, quiet_trainer, write_source_checkpoint

SIZES = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_source_checkpoint(tmp_path_factory.mktemp("src") / "source.safetensors", TINY_MODEL, 32, SIZES)


def task(source, **overrides) -> Distillation:
    args = {
        "model_name": TINY_MODEL,
        "num_registers": 2,
        "img_size": 32,
        "model_kwargs": SIZES,
        "checkpoint": str(source),
    }
    return Distillation(**{**args, **overrides})


def test_views_start_with_identity_and_are_distinct():
    views = view_transforms(6)
    assert views[0] == (0, 0, False)
    assert len(set(views)) == 6


@pytest.mark.parametrize("view", view_transforms(8))
def test_undo_view_puts_patches_back(view):
    # An image whose every 8x8 patch holds its own index: the patch grid of a view, moved back, is the identity.
    grid = torch.arange(16.0).reshape(1, 1, 4, 4)
    images = grid.repeat_interleave(8, 2).repeat_interleave(8, 3).expand(2, 3, 32, 32)
    seen = apply_view(images, view[:2], view[2], patch_size=8)
    patch_values = seen.unfold(2, 8, 8).unfold(3, 8, 8).mean((-1, -2))[:, 0]  # (B, 4, 4)
    restored = undo_view(patch_values[..., None], view[:2], view[2])[..., 0]
    assert torch.equal(restored, grid[0, 0].expand(2, 4, 4))


def test_single_view_targets_are_the_teacher_features(source):
    distill = task(source, num_views=1).eval()
    images = torch.randn(2, 3, 32, 32)
    cls, patches = distill.targets(images)
    teacher = build_backbone(TINY_MODEL, 0, checkpoint=source, img_size=32, **SIZES).eval()
    with torch.no_grad():
        expected = extract_features(teacher, images)
    torch.testing.assert_close(cls, expected.cls)
    torch.testing.assert_close(patches, expected.patches)


def test_teacher_stays_frozen_and_in_eval_mode(source):
    distill = task(source).train()
    assert not distill.teacher.training
    assert not any(p.requires_grad for p in distill.teacher.parameters())


@pytest.mark.parametrize(
    "trainable,expected",
    [
        ("registers", {"reg_token"}),
        ("registers+pos+last", {"reg_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.mlp.fc2.bias"}),
        (["blocks.0.attn.*"], {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias"}),
    ],
)
def test_trainable_settings(source, trainable, expected):
    distill = task(source, trainable=trainable)
    names = {n for n, p in distill.backbone.named_parameters() if p.requires_grad}
    assert expected <= names
    if trainable == "registers":
        assert names == {"reg_token"}
    assert "blocks.0.mlp.fc1.weight" not in names


def test_frozen_parameters_stay_bit_identical(source):
    distill = task(source, trainable="registers+pos+last", weight_decay=0.1, lr=1e-2)
    before = {n: p.detach().clone() for n, p in distill.backbone.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in distill.teacher.named_parameters()}
    data = SyntheticScenes(img_size=32, num_classes=4, train_size=48, val_size=16, batch_size=16)
    quiet_trainer(3).fit(distill, data)
    for name, param in distill.backbone.named_parameters():
        if param.requires_grad:
            continue
        assert torch.equal(param, before[name]), f"frozen {name} changed"
    assert not torch.equal(distill.backbone.reg_token, before["reg_token"])
    assert not torch.equal(distill.backbone.blocks[1].mlp.fc1.weight, before["blocks.1.mlp.fc1.weight"])
    for name, param in distill.teacher.named_parameters():
        assert torch.equal(param, teacher_before[name]), f"teacher {name} changed"


def test_student_learns_the_teacher_features(source):
    """~100 steps: the loss falls clearly and the student matches the teacher far better."""
    torch.manual_seed(0)
    distill = task(source, num_registers=4, trainable="all", lr=2e-3, warmup_steps=10, num_views=2)
    data = SyntheticScenes(img_size=32, num_classes=4, train_size=1600, val_size=64, batch_size=16)
    data.setup("fit")
    images = next(iter(data.val_dataloader()))["image"]
    with torch.no_grad():
        first = distill.eval()._losses(images)
    quiet_trainer(100).fit(distill, data)
    with torch.no_grad():
        last = distill.eval()._losses(images)
    assert last["loss"] < 0.5 * first["loss"], (first["loss"], last["loss"])
    assert 1 - last["patch_cos"] < 0.5 * (1 - first["patch_cos"])


def test_needs_a_source(source):
    with pytest.raises(RegablateError, match="needs a source model"):
        task(source, checkpoint=None)


def test_unknown_trainable_preset(source):
    with pytest.raises(RegablateError, match=r"unknown trainable setting 'registers\+all'"):
        task(source, trainable="registers+all")


def test_pattern_matching_nothing(source):
    with pytest.raises(RegablateError, match="'reg_token' matches no parameter"):
        task(source, num_registers=0, trainable="registers")


def test_fit_writes_a_checkpoint_that_build_backbone_loads(source, tmp_path):
    main(
        [
            "fit",
            "--config",
            str(REPO / "tests/configs/tiny_distill.yaml"),
            "--model.checkpoint",
            str(source),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ]
    )
    run = tmp_path / "tiny_distill" / "r2_s0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and "val/patch_cos" in summary
    student = build_backbone(TINY_MODEL, 2, checkpoint=run / "checkpoints" / "last.ckpt", img_size=32, **SIZES)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    torch.testing.assert_close(student.reg_token, state["backbone.reg_token"])
