"""DINO with registers: DINOv2's recipe in the task (iBOT, mask token, schedules, parameter groups), EMA,
multi-crop, head warm-up, a non-finite loss, no collapse."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
import yaml

from regablate.cli import main
from regablate.data import SyntheticScenes
from regablate.errors import RegablateError
from regablate.models.layout import TokenLayout
from regablate.tasks import DINO
from regablate.tasks.dino import cosine_schedule, ema_update, random_crops
from tests.conftest import REPO, TINY_MODEL, quiet_trainer

SIZES = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def task(**overrides) -> DINO:
    """A tiny DINO with the whole recipe on (iBOT with its own head, KoLeo, views) at tiny sizes."""
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
        "ibot_separate_head": True,
        "ibot_out_dim": 32,
        "ibot_hidden_dim": 32,
        "ibot_bottleneck_dim": 8,
        "drop_path_rate": 0.0,
        "freeze_last_layer_steps": 0,
        "warmup_steps": 1,
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
    t = dino.teacher_targets(teacher, dino.center, temperature=1.0)
    torch.testing.assert_close(t, F.softmax(teacher, -1))  # centring, with the centre still at 0
    loss = dino.dino_loss(student, t)
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


def test_head_warmup_freezes_the_backbone_and_mask_token_and_trains_both_heads():
    dino = task(head_warmup_steps=5)
    frozen = {n: p.detach().clone() for n, p in [*dino.student.named_parameters(), ("mask_token", dino.mask_token)]}
    heads = [dino.student_head.mlp[0].weight, dino.student_ibot_head.mlp[0].weight]
    heads_before = [w.detach().clone() for w in heads]
    data = SyntheticScenes(img_size=32, num_classes=4, train_size=64, val_size=16, batch_size=16)
    trainer = quiet_trainer(3)
    trainer.fit(dino, data)
    for name, param in [*dino.student.named_parameters(), ("mask_token", dino.mask_token)]:
        assert torch.equal(param, frozen[name]), f"{name} trained during the head warmup"
    assert all(not torch.equal(w, before) for w, before in zip(heads, heads_before))
    # The backbone and mask token got zero gradients (for DDP) that were dropped before the step:
    # AdamW holds no state for them yet, so their moments and step count start after the warm-up.
    state = trainer.optimizers[0].state
    assert not any(param in state for param in [*dino.student.parameters(), dino.mask_token])
    head_params = [*dino.student_head.parameters(), *dino.student_ibot_head.parameters()]
    assert all(param in state for param in head_params if param.requires_grad)


def test_the_views_use_the_normalisation_of_the_data_module():
    dino = task()
    assert dino.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])  # ImageNet's by default
    data = SyntheticScenes(img_size=32, num_classes=4, train_size=32, val_size=16, batch_size=16)
    data.mean, data.std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # what HFDataModule(mean=..., std=...) holds
    quiet_trainer(1).fit(dino, data)
    assert dino.mean.flatten().tolist() == pytest.approx([0.5, 0.4, 0.3])
    assert dino.std.flatten().tolist() == pytest.approx([0.2, 0.25, 0.3])


def test_the_mask_token_replaces_masked_patch_embeddings_before_the_position_embedding():
    dino = task(num_registers=2)
    student = dino.student
    with torch.no_grad():
        dino.mask_token.normal_()
    images = torch.randn(3, 3, 32, 32)
    masks = torch.zeros(3, 16, dtype=torch.bool)
    masks[0, :5] = masks[2, 7:] = True
    with torch.no_grad():
        patches = student.patch_embed(images)  # (B, 4, 4, D): dynamic_img_size keeps the grid
        patches = torch.where(masks.view(3, 4, 4, 1), dino.mask_token, patches)
        expected = student.norm(student.blocks(student.norm_pre(student._pos_embed(patches))))
        got = dino._tokens(images, masks)
    torch.testing.assert_close(got, expected)
    # CLS and registers enter the blocks as they would unmasked: the mask reaches patch embeddings only.
    seen = []
    hook = student.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        dino._tokens(images, torch.ones(3, 16, dtype=torch.bool))
        dino._tokens(images)
    hook.remove()
    prefix = TokenLayout.of(student).num_prefix
    assert prefix == 3
    torch.testing.assert_close(seen[0][:, :prefix], seen[1][:, :prefix])
    assert not torch.allclose(seen[0][:, prefix:], seen[1][:, prefix:])


def test_ibot_targets_are_the_teachers_masked_patch_tokens_through_the_ibot_head():
    torch.manual_seed(0)
    dino = task(num_registers=2).eval()
    images = torch.randn(4, 3, 32, 32)
    generator = torch.Generator().manual_seed(3)
    global_crops, _ = dino.crops(images, generator)
    masks = dino.masks(4, (4, 4), generator)
    assert masks.masks.any() and masks.masks.shape == (8, 16)
    with torch.no_grad():
        tokens = dino.backbone.forward_features(torch.cat(global_crops))
        expected = dino.teacher_ibot_head(tokens[:, 1 + 2 :][masks.masks])  # patches after CLS and 2 registers
        out = dino._shared_step(images, 0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out["teacher_patch_logits"], expected)
    assert set(out["terms"]) == {"DINO", "iBOT", "KoLeo"}
    extra = {k for k in dino.state_dict() if not k.startswith(("student", "backbone.", "teacher_"))}
    assert extra == {"mask_token", "center", "ibot_center"}  # the views keep nothing in checkpoints
    # iBOT and KoLeo off: DINO alone, no mask token, no iBOT head.
    plain = task(ibot_loss_weight=0.0, koleo_loss_weight=0.0)
    assert plain.mask_token is None and plain.student_ibot_head is None
    assert set(plain._shared_step(images, 0, torch.Generator().manual_seed(3))["terms"]) == {"DINO"}


def dinov2_lr_multiplier(name: str, num_layers: int, decay: float) -> float:
    """DINOv2's get_vit_lr_decay_rate (dinov2/utils/param_groups.py) for a backbone without chunks,
    with its patch-embedding multiplier; timm's reg_token is DINOv2's register_tokens."""
    layer_id = num_layers + 1
    if any(key in name for key in ("pos_embed", "patch_embed", "mask_token", "cls_token", "reg_token")):
        layer_id = 0
    elif "blocks." in name:
        layer_id = int(name[name.find("blocks.") :].split(".")[1]) + 1
    rate = decay ** (num_layers + 1 - layer_id)
    return rate * 0.2 if "patch_embed" in name else rate


def test_parameter_groups_are_dinov2s():
    dino = task(layerwise_decay=0.7, freeze_last_layer_steps=7)
    groups = dino.param_groups()
    names = {id(p): n for n, p in dino.named_parameters()}
    seen = set()
    for group in groups:
        for param in group["params"]:
            name = names[id(param)]
            seen.add(name)
            backbone_name = name.removeprefix("student.")
            if name.startswith("student.") or name == "mask_token":
                assert group["lr_multiplier"] == pytest.approx(dinov2_lr_multiplier(backbone_name, 2, 0.7)), name
            else:  # the heads
                assert group["lr_multiplier"] == 1.0, name
            no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name
            assert group["wd_multiplier"] == (0.0 if no_decay else 1.0), name
            assert group["frozen_steps"] == (7 if "prototypes" in name else 0), name
    trainable = {n for n, p in dino.named_parameters() if p.requires_grad}
    assert seen == trainable and not any(n.startswith(("backbone.", "teacher")) for n in seen)
    assert {"student.cls_token", "student.reg_token", "student.pos_embed", "mask_token"} <= seen  # decayed, as DINOv2


def test_schedules_of_the_optimiser_lr_scaling_weight_decay_and_the_frozen_prototypes():
    dino = task(lr=4e-3, weight_decay=0.04, weight_decay_end=0.4, freeze_last_layer_steps=2, warmup_steps=2)
    data = SyntheticScenes(img_size=32, num_classes=4, train_size=64, val_size=16, batch_size=16)
    trainer = quiet_trainer(6)
    trainer.fit(dino, data)
    schedule = trainer.lr_scheduler_configs[0].scheduler
    peak = 4e-3 * math.sqrt(16 / 1024)  # DINOv2's sqrt_wrt_1024 rule, global batch 16
    groups = trainer.optimizers[0].param_groups
    assert [g["initial_lr"] / g["lr_multiplier"] for g in groups] == pytest.approx([peak] * len(groups))
    assert [schedule.weight_decay_at(s) for s in (0, 3, 6)] == pytest.approx([0.04, 0.22, 0.4])
    prototypes = next(g for g in groups if g["frozen_steps"] == 2)
    other = next(g for g in groups if g["frozen_steps"] == 0 and g["lr_multiplier"] == 1 and g["wd_multiplier"] == 1)
    for step in range(6):
        schedule.last_epoch = step - 1
        schedule.step()
        assert prototypes["lr"] == (0.0 if step < 2 else pytest.approx(other["lr"])), step
        assert other["weight_decay"] == pytest.approx(schedule.weight_decay_at(step))
    assert other["lr"] > 0


def test_a_non_finite_loss_stops_the_run_naming_step_and_term_and_keeps_the_last_finite_checkpoint(
    tmp_path, capsys, monkeypatch
):
    koleo = DINO._koleo

    def nan_at_step_3(self, cls):
        value, backward = koleo(self, cls)
        return (value * math.nan, backward) if self.training and self.global_step == 3 else (value, backward)

    monkeypatch.setattr(DINO, "_koleo", nan_at_step_3)
    config = REPO / "tests" / "configs" / "tiny_dino.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("regablate: error")]
    assert len(err) == 1 and "non-finite KoLeo loss (nan) at step 3" in err[0], err
    checkpoint = torch.load(tmp_path / "tiny_dino" / "r2_s0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2  # validated and saved at step 2, before the NaN
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_loss_falls_without_collapse():
    torch.manual_seed(0)
    dino = task(lr=2e-3, lr_scaling_rule="none", warmup_steps=10, teacher_momentum=0.99, warmup_teacher_temp_steps=30)
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
    assert last["terms"]["DINO"] < first["terms"]["DINO"] - 0.3, (first["terms"], last["terms"])
    assert last["terms"]["iBOT"] < first["terms"]["iBOT"], (first["terms"], last["terms"])
    # Not collapsed: outputs neither uniform (entropy ~ log K) nor all on one prototype (batch entropy ~ 0).
    assert last["teacher_entropy"] < 0.9 * log_k
    assert last["teacher_batch_entropy"] > 0.3 * log_k
    assert last["feature_std"] > 1e-3


@pytest.mark.parametrize("name", ["paper_run.yaml", "paper_scratch.yaml"])
def test_the_paper_configs_carry_dinov2s_vitl14_recipe_and_build_at_tiny_size(name):
    path = REPO / "configs" / "fig8" / name
    recipe = yaml.safe_load(path.read_text())["model"]["init_args"]
    # DINOv2's ViT-L/14 values (dinov2/configs/train/vitl14.yaml over ssl_default_config.yaml).
    assert recipe["centering"] == "sinkhorn_knopp" and recipe["ibot_separate_head"] is True
    assert recipe["out_dim"] == recipe["ibot_out_dim"] == 131072 and recipe["bottleneck_dim"] == 384
    assert recipe["drop_path_rate"] == 0.4 and recipe["drop_path_uniform"] and recipe["layerwise_decay"] == 1.0
    assert (recipe["weight_decay"], recipe["weight_decay_end"], recipe["teacher_momentum"]) == (0.04, 0.2, 0.994)
    assert recipe["koleo_loss_weight"] == 0.1 and recipe["mask_ratio_min_max"] == [0.1, 0.5]
    # Each value of the recipe names its source: DINOv2's configs or code, or why a continued run differs.
    lines = path.read_text().split("\nmodel:\n", 1)[1].split("\ndata:", 1)[0].splitlines()[2:]  # init_args
    for line in lines:
        key = line.split(":")[0].strip()
        if key not in ("model_name", "num_registers", "compile", "grad_checkpointing"):  # how it runs, not the recipe
            assert re.search(r"\[(default|vitl14|code|continued)\b", line) or "from scratch" in line, line
    tiny = {
        **recipe,
        "model_name": TINY_MODEL,
        "pretrained": False,
        "img_size": 28,
        "model_kwargs": {"patch_size": 14, "embed_dim": 32, "depth": 2, "num_heads": 2},
        "out_dim": 64,
        "ibot_out_dim": 64,
        "local_crop_size": 14,
        "compile": False,  # a compile takes minutes on the CPU; tests/test_speed_switches.py compiles
    }
    dino = DINO(**tiny)
    out = dino._shared_step(torch.randn(2, 3, 28, 28), 0, torch.Generator().manual_seed(0))
    assert set(out["terms"]) == {"DINO", "iBOT", "KoLeo"} and torch.isfinite(out["loss"])
