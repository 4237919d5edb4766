"""The Classification task and the shared optimiser."""

from __future__ import annotations

import math

import pytest
import torch

from regablate.errors import RegablateError
from regablate.tasks import Classification
from regablate.tasks.optim import adamw_warmup_cosine
from tests.conftest import TINY, TINY_MODEL


def tiny_task(**overrides) -> Classification:
    sizes = {k: v for k, v in TINY.items() if k != "img_size"}
    args = {"model_name": TINY_MODEL, "num_registers": 4, "num_classes": 6, "img_size": 32, "model_kwargs": sizes}
    return Classification(**{**args, **overrides})


def test_no_weight_decay_on_tokens_biases_and_norms():
    task = tiny_task()
    config = adamw_warmup_cosine(task, lr=1e-3, weight_decay=0.05, warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    names = {id(p): n for n, p in task.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in config["optimizer"].param_groups}
    no_decay, decay = groups[0.0], groups[0.05]
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.reg_token"} <= no_decay
    assert "backbone.blocks.0.attn.qkv.bias" in no_decay and "backbone.norm.weight" in no_decay
    assert "backbone.blocks.0.attn.qkv.weight" in decay and "head.weight" in decay
    assert not no_decay & decay and no_decay | decay == set(names.values())


def test_warmup_then_cosine_schedule():
    task = tiny_task()
    config = adamw_warmup_cosine(task, lr=1.0, weight_decay=0.0, warmup_steps=4, total_steps=12, min_lr_ratio=0.1)
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[:5] == sorted(lrs[:5]) and lrs[4] == pytest.approx(1.0)
    # cosine from the peak to min_lr over the remaining 8 steps
    for step in range(4, 12):
        expected = 0.1 + 0.9 * (1 + math.cos(math.pi * (step - 4) / 8)) / 2
        assert lrs[step] == pytest.approx(expected, rel=1e-5)


def test_the_schedule_of_the_other_tasks_is_the_one_they_had():
    """Warm-up then cosine as LinearLR + CosineAnnealingLR gave it, constant weight decay: Classification
    and Distillation train as before DINO's parameter groups and weight-decay schedule arrived."""
    lr, warmup, total, ratio = 2e-3, 5, 40, 0.01
    config = adamw_warmup_cosine(
        tiny_task(), lr=lr, weight_decay=0.05, warmup_steps=warmup, total_steps=total, min_lr_ratio=ratio
    )
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    reference = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    old = torch.optim.lr_scheduler.SequentialLR(
        reference,
        [
            torch.optim.lr_scheduler.LinearLR(reference, start_factor=1e-3, end_factor=1.0, total_iters=warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=total - warmup, eta_min=lr * ratio),
        ],
        milestones=[warmup],
    )
    for step in range(total):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(reference.param_groups[0]["lr"], rel=1e-9), step
        assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.05]
        optimizer.step()
        schedule.step()
        reference.step()
        old.step()


def test_schedule_needs_a_finite_length():
    with pytest.raises(RegablateError, match="max_steps or trainer.max_epochs"):
        adamw_warmup_cosine(
            tiny_task(), lr=1.0, weight_decay=0.0, warmup_steps=1, total_steps=math.inf, min_lr_ratio=0.0
        )


@pytest.mark.parametrize("pool,width", [("cls", 32), ("mean", 32), ("cls+mean", 64)])
def test_pools_exclude_registers(pool, width):
    task = tiny_task(pool=pool).eval()
    assert task.head.in_features == width
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = task(images)
        tokens = task.backbone.forward_features(images)
    assert logits.shape == (2, 6)
    if pool == "mean":  # patches only: the 4 registers sit at positions 1..4
        torch.testing.assert_close(logits, task.head(tokens[:, 5:].mean(1)))


def test_freeze_backbone_trains_the_head_only():
    task = tiny_task(freeze_backbone=True)
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}


def test_too_few_classes():
    with pytest.raises(RegablateError, match="num_classes must be at least 2"):
        tiny_task(num_classes=1)


def test_metric_names_per_stage():
    task = tiny_task()
    assert set(task.val_metrics.keys()) == {"val/top1", "val/top5"}
    assert set(task.test_metrics.keys()) == {"test/top1", "test/top5"}
