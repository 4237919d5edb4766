"""DINO with registers: loss, EMA, schedules, multi-crop, head warmup, no collapse."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from regablate.data import SyntheticScenes
from regablate.errors import RegablateError
from regablate.tasks import DINO
from regablate.tasks.dino import cosine_schedule, ema_update, random_crops
from tests.conftest import TINY_MODEL, quiet_trainer

SIZES = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def task(**overrides) -> DINO:
    args = {
        "model_name": TINY_MODEL,
        "num_registers": 2,
        "img_size": 32,
        "model_kwargs": SIZES,
        "out_dim": 64,
        "hidden_dim": 64,
        "bottleneck_dim": 16,
        "num_local_crops": 2,
        "local_crop_size": 16,
    }
    return DINO(**{**args, **overrides})


def test_ema_update_matches_its_formula():
    teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.9 * t.detach() + 0.1 * s.detach() for t, s in zip(teacher.parameters(), student.parameters())]
    ema_update(teacher, student, 0.9)
    for got, want in zip(teacher.parameters(), expected):
        torch.testing.assert_close(got, want)


def test_teacher_starts_as_the_student_and_follows_by_ema():
    dino = task(teacher_momentum=0.9)
    for t, s in zip(dino.backbone.parameters(), dino.student.parameters()):
        assert torch.equal(t, s)
    assert not any(p.requires_grad for p in dino.backbone.parameters())
    assert not any(p.requires_grad for p in dino.teacher_head.parameters())
    teacher_before = [p.detach().clone() for p in [*dino.backbone.parameters(), *dino.teacher_head.parameters()]]
    data = SyntheticScenes(img_size=32, num_classes=4, train_size=64, val_size=16, batch_size=16)
    quiet_trainer(1).fit(dino, data)
    # One optimiser step: the student moved, and the teacher moved 1 - 0.9 of the way towards it
    # (the momentum schedule starts at teacher_momentum at step 0).
    teacher = [*dino.backbone.parameters(), *dino.teacher_head.parameters()]
    student = [*dino.student.parameters(), *dino.student_head.parameters()]
    assert not torch.equal(teacher[0], teacher_before[0])
    for t, before, s in zip(teacher, teacher_before, student):
        torch.testing.assert_close(t, 0.9 * before + 0.1 * s.detach())


def test_schedules():
    assert cosine_schedule(0.996, 1.0, 0, 100) == pytest.approx(0.996)
    assert cosine_schedule(0.996, 1.0, 50, 100) == pytest.approx(0.998)
    assert cosine_schedule(0.996, 1.0, 100, 100) == pytest.approx(1.0)
    dino = task(warmup_teacher_temp=0.04, teacher_temp=0.08, warmup_teacher_temp_steps=10)
    assert [dino.teacher_temperature(s) for s in (0, 5, 10, 50)] == pytest.approx([0.04, 0.06, 0.08, 0.08])


def test_dino_loss_by_hand():
    dino = task(out_dim=3)
    student = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # 3 crops x batch 1
    teacher = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])  # 2 global crops x batch 1
    loss, _ = dino.dino_loss(student, teacher, temperature=1.0)
    t = F.softmax(teacher, -1)
    s = F.log_softmax(student / dino.hparams.student_temp, -1)
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    expected = sum(-(t[i] * s[j]).sum() for i, j in pairs) / 4
    torch.testing.assert_close(loss, expected)


def test_random_crops_shapes_and_local_crops_through_the_backbone():
    images = torch.randn(4, 3, 32, 32)
    crops = random_crops(images, 3, 16, (0.1, 0.4), torch.Generator().manual_seed(0))
    assert len(crops) == 3 and all(c.shape == (4, 3, 16, 16) for c in crops)
    dino = task()
    tokens = dino.student.forward_features(crops[0])
    assert tokens.shape == (4, 1 + 2 + 4, 32), "16 px local crops: 2x2 patches, position embedding resampled"


def test_ranks_get_the_crops_of_their_samples_in_the_global_batch():
    images = torch.randn(8, 3, 32, 32)
    whole = random_crops(images, 2, 16, (0.1, 0.4), torch.Generator().manual_seed(3))
    for rank in (0, 1):  # the distributed sampler deals samples rank::2
        part = random_crops(
            images[rank::2], 2, 16, (0.1, 0.4), torch.Generator().manual_seed(3), rank=rank, world_size=2
        )
        for crop, full in zip(part, whole):
            torch.testing.assert_close(crop, full[rank::2])


def test_bad_local_crop_size():
    with pytest.raises(RegablateError, match="local_crop_size 12 must be a multiple of the patch size 8"):
        task(local_crop_size=12)


def test_head_warmup_freezes_the_backbone():
    dino = task(head_warmup_steps=5)
    before = {n: p.detach().clone() for n, p in dino.student.named_parameters()}
    head_before = dino.student_head.mlp[0].weight.detach().clone()
    data = SyntheticScenes(img_size=32, num_classes=4, train_size=64, val_size=16, batch_size=16)
    trainer = quiet_trainer(3)
    trainer.fit(dino, data)
    for name, param in dino.student.named_parameters():
        assert torch.equal(param, before[name]), f"{name} trained during the head warmup"
    assert not torch.equal(dino.student_head.mlp[0].weight, head_before)
    # The backbone got zero gradients (for DDP) that were dropped before the step: AdamW holds no
    # state for it yet, so its moments and step count start after the warm-up.
    state = trainer.optimizers[0].state
    assert not any(param in state for param in dino.student.parameters())
    assert all(param in state for param in dino.student_head.parameters() if param.requires_grad)


def test_loss_falls_without_collapse():
    torch.manual_seed(0)
    dino = task(lr=2e-3, warmup_steps=10, teacher_momentum=0.99, warmup_teacher_temp_steps=30)
    data = SyntheticScenes(img_size=32, num_classes=4, train_size=1600, val_size=32, batch_size=16)
    data.setup("fit")
    images = next(iter(data.val_dataloader()))["image"]

    def evaluate() -> dict:
        with torch.no_grad():
            return dino.eval()._shared_step(images, 0, torch.Generator().manual_seed(0))

    first = evaluate()
    trainer = quiet_trainer(100)
    trainer.fit(dino, data)
    last = evaluate()
    log_k = math.log(64)
    assert last["loss"] < first["loss"] - 0.3, (first["loss"], last["loss"])
    # Not collapsed: outputs neither uniform (entropy ~ log K) nor all on one prototype (batch entropy ~ 0).
    assert last["teacher_entropy"] < 0.9 * log_k
    assert last["teacher_batch_entropy"] > 0.3 * log_k
    assert last["feature_std"] > 1e-3
