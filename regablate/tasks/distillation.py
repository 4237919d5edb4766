"""Post-hoc registers: distil a frozen model into a copy of itself that has R registers.

A model trained without registers keeps its artifacts (high-norm tokens on background) in the
patch features. Adding registers and training the copy to reproduce the original's features
would copy the artifacts too, so the targets are denoised first (PH-Reg, 2025): the teacher
sees V views of each image, shifted by whole patches and flipped; each view's features are
moved back into place and the views are averaged. Content moves with the shift and comes back,
artifacts sit wherever the teacher put its scratch space, so the average keeps the content and
washes the artifacts out.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveInt
from torch import Tensor

from regablate.errors import RegablateError
from regablate.models.backbone import extract_features
from regablate.models.layout import Backbone
from regablate.tasks.base import BackboneTask
from regablate.tasks.optim import require_finite

# Views are deterministic: identity first, then a flip, then whole-patch shifts with and without it.
_SHIFTS = ((0, 0), (1, 1), (-1, -1), (1, -2), (-2, 1), (2, 2), (-2, -2), (2, -1))
TRAINABLE_PRESETS = ("registers", "registers+pos+last", "all")


def view_transforms(num_views: int) -> list[tuple[int, int, bool]]:
    """``num_views`` (shift_y, shift_x in patches, flip) triples; the first is the identity."""
    if not 1 <= num_views <= 2 * len(_SHIFTS):
        raise RegablateError(f"num_views must be between 1 and {2 * len(_SHIFTS)}, got {num_views}")
    return [(*_SHIFTS[v // 2], v % 2 == 1) for v in range(num_views)]


def apply_view(images: Tensor, shift: tuple[int, int], flip: bool, patch_size: int) -> Tensor:
    """Roll ``images`` by whole patches (so the patch grid stays aligned), then mirror them."""
    out = torch.roll(images, shifts=(shift[0] * patch_size, shift[1] * patch_size), dims=(2, 3))
    return out.flip(3) if flip else out


def undo_view(grid_features: Tensor, shift: tuple[int, int], flip: bool) -> Tensor:
    """Put (B, H, W, D) patch features of a view back where the original image has them."""
    out = grid_features.flip(2) if flip else grid_features
    return torch.roll(out, shifts=(-shift[0], -shift[1]), dims=(1, 2))


def trainable_patterns(trainable: str | list[str], student: Backbone) -> list[str]:
    """Parameter-name patterns of the student that train; everything else stays frozen.

    The position embedding is the learned ``pos_embed`` where the student has one; RoPE (DINOv3,
    the RoPE ViTs) has no learned position parameter, so there the preset trains the rest only.
    """
    if isinstance(trainable, list):
        return trainable
    position = ["pos_embed"] if student.pos_embed is not None else []
    presets = {
        "registers": ["reg_token"],
        "registers+pos+last": ["reg_token", *position, "patch_embed.*", f"blocks.{len(student.blocks) - 1}.*"],
        "all": ["*"],
    }
    if trainable not in presets:
        raise RegablateError(
            f"unknown trainable setting {trainable!r}: use one of {', '.join(TRAINABLE_PRESETS)} "
            "or a list of parameter-name patterns such as ['reg_token', 'blocks.11.*']"
        )
    return presets[trainable]


class Distillation(BackboneTask):
    """Continued pretraining after adding registers: a student with R registers learns the
    frozen source model's view-averaged patch and CLS features.

    ``self.backbone`` is the student (what the run produces: its checkpoint loads with
    ``build_backbone(checkpoint=...)``); ``self.teacher`` is the source model, frozen, always in
    eval mode and run without gradients, once on all views batched together. Logs
    ``train/loss``, ``train/loss_patch``, ``train/loss_cls``, ``train/feature_std`` (std of the
    student's patch features over tokens: near 0 means collapse), and ``val/loss``,
    ``val/patch_cos`` (mean cosine between student and target patches).
    """

    def __init__(
        self,
        teacher_registers: int = 0,
        trainable: str | list[str] = "registers+pos+last",
        num_views: PositiveInt = 4,
        patch_cosine_weight: NonNegativeFloat = 1.0,
        patch_mse_weight: NonNegativeFloat = 1.0,
        cls_weight: NonNegativeFloat = 1.0,
        register_init_std: NonNegativeFloat = 0.02,
        model_name: str = "vit_small_patch14_dinov2",
        weight_decay: NonNegativeFloat = 0.0,
        warmup_steps: NonNegativeInt = 50,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            teacher_registers: registers the source model was trained with (0 for most models).
            trainable: ``registers``, ``registers+pos+last`` (registers, position (a learned ``pos_embed``) and patch
                embedding, last block), ``all``, or a list of parameter-name patterns.
            num_views: teacher views averaged into each target (1: no denoising).
            patch_cosine_weight: weight of (1 - cosine) between student and target patches.
            patch_mse_weight: weight of the MSE between student and target patches.
            cls_weight: weight of the CLS loss ((1 - cosine) + MSE; the pooled feature for a ViT without CLS).
            register_init_std: std of the normal new registers start from.
            model_name: timm ViT name of the source model (the recipe's default: DINOv2 ViT-S/14).
            weight_decay: AdamW weight decay (the recipe's default: none, few parameters train).
            warmup_steps: linear warmup steps before the cosine decay.
            **kwargs: the other backbone and optimiser arguments of ``BackboneTask``; ``checkpoint``
                or ``pretrained`` name the source model's weights.
        """
        super().__init__(model_name=model_name, weight_decay=weight_decay, warmup_steps=warmup_steps, **kwargs)

    def configure_models(self) -> None:
        hp = self.hparams
        if hp.checkpoint is None and not hp.pretrained:
            raise RegablateError(
                "Distillation needs a source model: set model.checkpoint (a local file or a run's .ckpt) "
                "or model.pretrained: true"
            )
        self.views = view_transforms(hp.num_views)
        self.teacher = self.make_backbone(hp.teacher_registers).eval().requires_grad_(False)
        self.backbone = self.make_backbone(register_init_std=hp.register_init_std)
        self._freeze_all_but(trainable_patterns(hp.trainable, self.backbone))

    def _freeze_all_but(self, patterns: list[str]) -> None:
        names = [name for name, _ in self.backbone.named_parameters()]
        for pattern in patterns:
            if not any(fnmatch.fnmatch(name, pattern) for name in names):
                raise RegablateError(
                    f"trainable pattern {pattern!r} matches no parameter of the student "
                    f"(e.g. {', '.join(names[:4])}; with 0 registers there is no reg_token)"
                )
        for name, param in self.backbone.named_parameters():
            param.requires_grad_(any(fnmatch.fnmatch(name, p) for p in patterns))

    def train(self, mode: bool = True) -> Distillation:
        super().train(mode)
        self.teacher.eval()  # the teacher never drops paths or tokens
        return self

    @torch.no_grad()
    def targets(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher's view-averaged (CLS (B, D), patches (B, N, D)) for ``images``."""
        patch = self.teacher.patch_embed.patch_size[0]
        views = torch.cat([apply_view(images, (dy, dx), flip, patch) for dy, dx, flip in self.views])
        features = extract_features(self.teacher, views)
        batch = images.shape[0]
        grid_h, grid_w = self.teacher.patch_embed.grid_size
        patches = features.patches.reshape(len(self.views), batch, grid_h, grid_w, -1)
        aligned = torch.stack([undo_view(patches[v], (dy, dx), flip) for v, (dy, dx, flip) in enumerate(self.views)])
        cls = features.pooled.reshape(len(self.views), batch, -1).mean(0)
        return cls, aligned.mean(0).flatten(1, 2)

    def _losses(self, images: Tensor) -> dict[str, Tensor]:
        target_cls, target_patches = self.targets(images)
        student = extract_features(self.backbone, images)
        hp = self.hparams
        patch_cos = F.cosine_similarity(student.patches, target_patches, dim=-1).mean()
        loss_patch = hp.patch_cosine_weight * (1 - patch_cos) + hp.patch_mse_weight * F.mse_loss(
            student.patches, target_patches
        )
        loss_cls = (1 - F.cosine_similarity(student.pooled, target_cls, dim=-1).mean()) + F.mse_loss(
            student.pooled, target_cls
        )
        return {
            "loss": loss_patch + hp.cls_weight * loss_cls,
            "loss_patch": loss_patch,
            "loss_cls": loss_cls,
            "patch_cos": patch_cos,
            "feature_std": student.patches.detach().std(dim=1).mean(),
        }

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        losses = self._losses(batch["image"])
        require_finite(losses["loss"], self.global_step)
        self.log("train/loss", losses["loss"], prog_bar=True)
        self.log_dict({f"train/{k}": losses[k] for k in ("loss_patch", "loss_cls", "feature_std")})
        return losses["loss"]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        losses = self._losses(batch["image"])
        self.log("val/loss", losses["loss"], prog_bar=True, sync_dist=True)
        self.log("val/patch_cos", losses["patch_cos"], sync_dist=True)
