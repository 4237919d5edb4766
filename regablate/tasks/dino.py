"""DINOv2's self-distillation recipe with registers: DINO + iBOT + KoLeo, from scratch or continued.

A student ViT with R registers and an EMA teacher (Oquab et al. 2023; facebookresearch/dinov2
``dinov2/train/ssl_meta_arch.py``):

- **DINO** (image level): the teacher sees the two global crops of an image, the student those and
  ``num_local_crops`` small ones; through a DINO head (MLP, then weight-normalised prototypes) the
  student learns the teacher's distribution of every other crop's CLS token.
- **iBOT** (patch level): block-wise masks hide patches of the student's global crops (a learnable
  mask token replaces their patch embeddings before the position embedding is added, as DINOv2's
  ``prepare_tokens_with_masks`` does); the student learns the teacher's distribution of each
  hidden patch, through the DINO head or a separate iBOT head. Masks cover patches only, never the
  CLS token or the registers, and only the masked patches go through the heads.
- **KoLeo** spreads the student's CLS features of each global crop over the sphere.
- **Centring**: the teacher's targets are balanced by Sinkhorn-Knopp (``sinkhorn_knopp``) or
  centred by an EMA of its outputs (``centering``), for DINO and iBOT alike.
- **Views**: multi-crop on the batch tensor with ``roi_align`` (one random box per image and crop),
  then DINOv2's photometric views (``regablate.tasks.views``) on the same device, so any data module
  that yields normalised ``image`` batches works. Local crops resample the position embedding
  (timm's antialiased bicubic interpolation, ``dynamic_img_size``).
- **Optimisation**: DINOv2's parameter groups (layer-wise learning-rate decay, patch-embedding
  multiplier, the prototypes frozen for the first ``freeze_last_layer_steps``), weight decay by
  cosine, the learning rate scaled with the global batch, gradients clipped per student module,
  stochastic depth (uniform or linear over the blocks), teacher temperature warm-up, teacher
  momentum by cosine.

Under DDP the Sinkhorn-Knopp sums and the centres are reduced over ranks, and crops, views and
masks are drawn for the global batch, so N devices train what one device trains on the same global
batch. ``docs/dinov2_recipe.md`` lists what of DINOv2's recipe this runs and where it differs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)
from timm.layers import DropPath
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm
from torchvision.ops import roi_align

from regablate.data.common import IMAGENET_MEAN, IMAGENET_STD
from regablate.errors import RegablateError
from regablate.hparams import Fraction, PositiveFraction
from regablate.models.backbone import global_feature
from regablate.models.layout import TokenLayout
from regablate.tasks.base import BackboneTask
from regablate.tasks.losses import koleo_loss, masked_patch_loss, sinkhorn_knopp
from regablate.tasks.masking import Masks, draw_masks
from regablate.tasks.optim import dinov2_param_groups, scaled_lr
from regablate.tasks.views import DINOV2_BLUR_PROBS, PhotometricViews

Centering = Literal["sinkhorn_knopp", "centering"]
LRScalingRule = Literal["sqrt_wrt_1024", "none"]
# DINOv2 counts several schedules in epochs of OFFICIAL_EPOCH_LENGTH = 1250 iterations; here they are steps.
EPOCH = 1250
# The loss terms, as a non-finite one is named to the user.
TERMS = ("DINO", "iBOT", "KoLeo")


class DINOHead(nn.Module):
    """MLP to a bottleneck, L2 normalisation, then weight-normalised prototypes (DINOv2's ``DINOHead``).

    The prototypes' magnitude starts at 1 and trains, as in DINOv2 (DINO froze it at 1).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.prototypes = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.prototypes.parametrizations.weight.original0.data.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.prototypes(F.normalize(self.mlp(x), dim=-1))


def random_crops(
    images: Tensor,
    num: int,
    size: int,
    scale: tuple[float, float],
    generator: torch.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> list[Tensor]:
    """``num`` batches of random resized crops (one box per image each), randomly mirrored.

    Boxes follow RandomResizedCrop: area ``scale`` of the image, aspect ratio in [3/4, 4/3].
    Under DDP the boxes are drawn for the whole global batch and each rank keeps the rows of
    its own samples (``rank::world_size``, the way the distributed sampler deals them out),
    so every image gets the same crops on any number of devices.
    """
    batch, _, height, width = images.shape
    total = batch * world_size
    crops = []
    for _ in range(num):
        area = torch.empty(total).uniform_(*scale, generator=generator)[rank::world_size] * height * width
        log_ratio = torch.empty(total).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)[rank::world_size]
        ratio = log_ratio.exp()
        w = (area * ratio).sqrt().clamp(max=width)
        h = (area / ratio).sqrt().clamp(max=height)
        x0 = torch.rand(total, generator=generator)[rank::world_size] * (width - w)
        y0 = torch.rand(total, generator=generator)[rank::world_size] * (height - h)
        boxes = torch.stack([torch.arange(batch, dtype=torch.float), x0, y0, x0 + w, y0 + h], dim=1)
        crop = roi_align(images, boxes.to(images), output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
        flip = (torch.rand(total, generator=generator) < 0.5)[rank::world_size]
        crops.append(torch.where(flip.to(images.device)[:, None, None, None], crop.flip(3), crop))
    return crops


def cosine_schedule(start: float, end: float, step: int, total: int) -> float:
    """Cosine interpolation from ``start`` (step 0) to ``end`` (step ``total``)."""
    progress = min(max(step / max(total, 1), 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    teacher_params: list[Tensor] = list(teacher.parameters())
    student_params: list[Tensor] = list(student.parameters())
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)


def zero_gradient_anchor(params: Iterable[Tensor]) -> Tensor:
    """``0 * sum(p.sum())`` over the ``params`` that train: a zero term for the loss.

    Under DDP (``find_unused_parameters=False``) every trainable parameter must receive a
    gradient each step, or the reducer fails at the next one. During the head warm-up the
    backbone runs without autograd (no activations kept, no backward through it); this term gives
    each of its parameters a zero gradient at the cost of one sum per tensor, instead of DDP's
    ``find_unused_parameters=True``, which walks the autograd graph every step of the whole run.
    """
    trainable = [param.sum() for param in params if param.requires_grad]
    return torch.stack(trainable).sum() * 0.0 if trainable else torch.zeros(())


class DINO(BackboneTask):
    """DINOv2's recipe (DINO + iBOT + KoLeo) with an EMA teacher and multi-crop, with R registers.

    ``self.backbone`` is the EMA teacher's backbone, the model DINOv2 evaluates and the one a
    checkpoint of this task gives to ``build_backbone(checkpoint=...)``; ``self.student`` is
    trained by AdamW, with ``self.mask_token`` (iBOT). Every default is DINOv2's
    (``dinov2/configs/ssl_default_config.yaml``); schedules DINOv2 counts in epochs of 1250
    iterations are given in steps. Logs ``train/loss`` (the sum of the terms), ``train/dino_loss``,
    ``train/ibot_loss``, ``train/koleo_loss``, ``train/teacher_momentum``, ``train/teacher_temp``
    and collapse signals: ``train/teacher_entropy`` (mean entropy of the teacher's CLS targets, in
    nats; it tends to log(out_dim) when they go uniform), ``train/teacher_batch_entropy`` (entropy of
    their batch mean; it tends to 0 when every image maps to one prototype) and
    ``train/feature_std`` (std of the student's CLS features over the batch). Validation logs
    ``val/loss`` and ``val/teacher_entropy`` on fixed crops, views and masks.
    """

    center: Tensor
    ibot_center: Tensor
    mean: Tensor
    std: Tensor

    def __init__(
        self,
        out_dim: PositiveInt = 65536,
        hidden_dim: PositiveInt = 2048,
        bottleneck_dim: PositiveInt = 256,
        num_local_crops: NonNegativeInt = 8,
        local_crop_size: PositiveInt = 96,
        global_crop_scale: tuple[PositiveFraction, PositiveFraction] = (0.32, 1.0),
        local_crop_scale: tuple[PositiveFraction, PositiveFraction] = (0.05, 0.32),
        photometric_views: bool = True,
        blur_probs: tuple[ClosedUnitInterval, ClosedUnitInterval, ClosedUnitInterval] = DINOV2_BLUR_PROBS,
        solarize_prob: ClosedUnitInterval = 0.2,
        student_temp: PositiveFloat = 0.1,
        teacher_temp: PositiveFloat = 0.07,
        warmup_teacher_temp: PositiveFloat = 0.04,
        warmup_teacher_temp_steps: NonNegativeInt = 30 * EPOCH,
        centering: Centering = "centering",
        sinkhorn_iterations: PositiveInt = 3,
        center_momentum: ClosedUnitInterval = 0.9,
        teacher_momentum: ClosedUnitInterval = 0.992,
        ibot_loss_weight: NonNegativeFloat = 1.0,
        mask_ratio_min_max: tuple[Fraction, Fraction] = (0.1, 0.5),
        mask_sample_probability: ClosedUnitInterval = 0.5,
        ibot_separate_head: bool = False,
        ibot_out_dim: PositiveInt = 65536,
        ibot_hidden_dim: PositiveInt = 2048,
        ibot_bottleneck_dim: PositiveInt = 256,
        koleo_loss_weight: NonNegativeFloat = 0.1,
        drop_path_rate: Fraction = 0.3,
        drop_path_uniform: bool = True,
        layerwise_decay: PositiveFraction = 0.9,
        patch_embed_lr_mult: NonNegativeFloat = 0.2,
        freeze_last_layer_steps: NonNegativeInt = EPOCH,
        head_warmup_steps: NonNegativeInt = 0,
        lr: PositiveFloat = 4e-3,
        lr_scaling_rule: LRScalingRule = "sqrt_wrt_1024",
        weight_decay: NonNegativeFloat = 0.04,
        weight_decay_end: NonNegativeFloat = 0.4,
        warmup_steps: NonNegativeInt = 10 * EPOCH,
        min_lr_ratio: ClosedUnitInterval = 2.5e-4,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            out_dim: prototypes K of the DINO head.
            hidden_dim: width of the DINO head's MLP.
            bottleneck_dim: width before the prototypes.
            num_local_crops: small crops per image seen by the student only.
            local_crop_size: side of a local crop in pixels (a multiple of the patch size).
            global_crop_scale: area range (low, high) of the two global crops, as a fraction of the image.
            local_crop_scale: area range of the local crops.
            photometric_views: DINOv2's colour jitter, grayscale, blur and solarisation on the crops.
            blur_probs: Gaussian-blur probabilities of the first global crop, the second, the local
                crops; the default is what DINOv2's code applies (``regablate.tasks.views``).
            solarize_prob: solarisation probability of the second global crop.
            student_temp: student softmax temperature (DINO and iBOT).
            teacher_temp: teacher temperature after its warm-up.
            warmup_teacher_temp: teacher temperature at step 0, raised linearly to ``teacher_temp``.
            warmup_teacher_temp_steps: steps of that warm-up (DINOv2: 30 epochs).
            centering: the teacher's targets: ``sinkhorn_knopp`` (balanced over the batch, DINOv2
                ViT-L/14) or ``centering`` (softmax after subtracting an EMA of its outputs).
            sinkhorn_iterations: Sinkhorn-Knopp iterations.
            center_momentum: EMA momentum of the centres (``centering`` only).
            teacher_momentum: EMA momentum of the teacher at step 0, raised to 1 by a cosine.
            ibot_loss_weight: weight of the iBOT masked-patch loss (0: no iBOT, no masks, no mask token).
            mask_ratio_min_max: range of the fraction of a masked crop's patches that are masked.
            mask_sample_probability: fraction of the global crops that are masked.
            ibot_separate_head: iBOT's own head (DINOv2 ViT-L/14) instead of the DINO head.
            ibot_out_dim: prototypes of the separate iBOT head.
            ibot_hidden_dim: width of its MLP.
            ibot_bottleneck_dim: its width before the prototypes.
            koleo_loss_weight: weight of the KoLeo regulariser on the student's CLS features (0: off).
            drop_path_rate: stochastic depth of the student's blocks.
            drop_path_uniform: the same rate in every block (DINOv2), else rising linearly from 0 (timm).
            layerwise_decay: learning rate of block i times ``layerwise_decay ** (depth - i)`` (1: none).
            patch_embed_lr_mult: learning-rate multiplier of the patch embedding.
            freeze_last_layer_steps: steps during which the heads' prototypes do not train (DINOv2: 1 epoch).
            head_warmup_steps: steps during which only the heads train (the backbone and the mask
                token stay frozen); use it when continuing from a checkpoint, whose heads start from scratch.
            lr: peak AdamW learning rate for a global batch of 1024 images under ``sqrt_wrt_1024``,
                else the peak itself.
            lr_scaling_rule: ``sqrt_wrt_1024`` (DINOv2): the peak is ``lr * sqrt(global batch / 1024)``,
                the global batch being the images per optimiser step over all devices; ``none``: ``lr``.
            weight_decay: AdamW weight decay at step 0 (none on biases, norms and LayerScale).
            weight_decay_end: weight decay at the last step, reached by a cosine.
            warmup_steps: linear warm-up steps of the learning rate (DINOv2: 10 epochs), then cosine decay.
            min_lr_ratio: final learning rate as a fraction of the peak (DINOv2: 1e-6 for 4e-3).
            **kwargs: the other backbone arguments of ``BackboneTask``; with ``checkpoint`` or
                ``pretrained`` training continues from those weights (any register count) and the
                heads and the mask token start from scratch; ``img_size`` is the global crop side.
        """
        super().__init__(
            lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, **kwargs
        )

    def configure_models(self) -> None:
        hp = self.hparams
        self._check_arguments()
        self.student = self.make_backbone(dynamic_img_size=True)
        patch = self.student.patch_embed.patch_size[0]
        if hp.local_crop_size % patch:
            raise RegablateError(f"local_crop_size {hp.local_crop_size} must be a multiple of the patch size {patch}")
        set_drop_path(self.student, hp.drop_path_rate, hp.drop_path_uniform)
        dim = self.student.embed_dim
        self.student_head = DINOHead(dim, hp.out_dim, hp.hidden_dim, hp.bottleneck_dim)
        self.backbone = self.make_backbone(weights=False, dynamic_img_size=True)
        self.backbone.load_state_dict(self.student.state_dict())
        self.teacher_head = DINOHead(dim, hp.out_dim, hp.hidden_dim, hp.bottleneck_dim)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        self.register_buffer("center", torch.zeros(1, hp.out_dim))
        self.do_ibot = hp.ibot_loss_weight > 0
        self.student_ibot_head = self.teacher_ibot_head = None
        self.mask_token = None
        if self.do_ibot:
            self.mask_token = nn.Parameter(torch.zeros(1, dim))  # DINOv2's initial mask token
            ibot_dim = hp.out_dim
            if hp.ibot_separate_head:
                ibot_dim = hp.ibot_out_dim
                self.student_ibot_head = DINOHead(dim, hp.ibot_out_dim, hp.ibot_hidden_dim, hp.ibot_bottleneck_dim)
                self.teacher_ibot_head = DINOHead(dim, hp.ibot_out_dim, hp.ibot_hidden_dim, hp.ibot_bottleneck_dim)
                self.teacher_ibot_head.load_state_dict(self.student_ibot_head.state_dict())
            self.register_buffer("ibot_center", torch.zeros(1, ibot_dim))
        for teacher in self._teacher_parts():
            teacher.requires_grad_(False)
        self.views = PhotometricViews(hp.blur_probs, hp.solarize_prob) if hp.photometric_views else None
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)

    def _check_arguments(self) -> None:
        hp = self.hparams
        for name in ("global_crop_scale", "local_crop_scale", "mask_ratio_min_max"):
            low, high = hp[name]
            if low > high:
                raise RegablateError(f"{name} is a range (low, high) with low <= high, got {tuple(hp[name])}")
        if "drop_path_rate" in (hp.model_kwargs or {}):
            raise RegablateError(
                "set the student's stochastic depth with model.init_args.drop_path_rate (and drop_path_uniform), "
                "not model_kwargs.drop_path_rate"
            )

    def _student_parts(self) -> list[list[nn.Parameter]]:
        """The student's modules as DINOv2 clips them: backbone (with the mask token), DINO head, iBOT head."""
        backbone = [*self.student.parameters(), *([self.mask_token] if self.mask_token is not None else [])]
        heads = [list(head.parameters()) for head in (self.student_head, self.student_ibot_head) if head is not None]
        return [backbone, *heads]

    def _teacher_parts(self) -> list[nn.Module]:
        return [m for m in (self.backbone, self.teacher_head, self.teacher_ibot_head) if m is not None]

    def setup(self, stage: str) -> None:
        """Read the data's normalisation, which the photometric views undo and redo (ImageNet's by default)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        mean, std = (
            tuple(getattr(datamodule, key, default))
            for key, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD))
        )
        self.mean.copy_(torch.tensor(mean).view(3, 1, 1))
        self.std.copy_(torch.tensor(std).view(3, 1, 1))

    def train(self, mode: bool = True) -> DINO:
        super().train(mode)
        for teacher in self._teacher_parts():
            teacher.eval()
        return self

    # -- optimisation ------------------------------------------------------------------------

    def param_groups(self) -> list[dict[str, Any]]:
        """DINOv2's groups over the student, its mask token and its heads (``regablate.tasks.optim``)."""
        hp = self.hparams
        backbone = list(self.student.named_parameters())
        if self.mask_token is not None:
            backbone.append(("mask_token", self.mask_token))
        heads = [
            (f"{prefix}.{name}", param)
            for prefix, head in (("dino_head", self.student_head), ("ibot_head", self.student_ibot_head))
            if head is not None
            for name, param in head.named_parameters()
        ]
        return dinov2_param_groups(
            backbone,
            heads,
            num_blocks=len(self.student.blocks),
            layerwise_decay=hp.layerwise_decay,
            patch_embed_lr_mult=hp.patch_embed_lr_mult,
            last_layer="prototypes",
            last_layer_frozen_steps=hp.freeze_last_layer_steps,
        )

    def peak_lr(self) -> float:
        """``lr`` scaled by ``lr_scaling_rule`` for the images of one optimiser step over all devices."""
        hp = self.hparams
        if hp.lr_scaling_rule == "none":
            return hp.lr
        return scaled_lr(hp.lr, hp.lr_scaling_rule, self.global_batch_size())

    def global_batch_size(self) -> int:
        """Images per optimiser step over all devices: the data module's batch size x devices x accumulation."""
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        per_device = getattr(datamodule, "batch_size", None) or dict(getattr(datamodule, "hparams", {})).get(
            "batch_size"
        )
        if not per_device:
            raise RegablateError(
                "lr_scaling_rule sqrt_wrt_1024 needs the batch size, which the data module does not say; set "
                "model.init_args.lr_scaling_rule: none and give the peak learning rate as model.init_args.lr"
            )
        return int(per_device) * trainer.world_size * trainer.accumulate_grad_batches

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip the gradient norm of each student module on its own (backbone, DINO head, iBOT head), as DINOv2."""
        if gradient_clip_val is None or gradient_clip_algorithm == "value":
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        for params in self._student_parts():
            with_grad = [p for p in params if p.grad is not None]
            if with_grad:
                torch.nn.utils.clip_grad_norm_(with_grad, gradient_clip_val)

    # -- schedules -----------------------------------------------------------------------------

    def teacher_temperature(self, step: int) -> float:
        hp = self.hparams
        if step >= hp.warmup_teacher_temp_steps:
            return hp.teacher_temp
        return hp.warmup_teacher_temp + (hp.teacher_temp - hp.warmup_teacher_temp) * step / hp.warmup_teacher_temp_steps

    def teacher_momentum(self, step: int) -> float:
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        return cosine_schedule(self.hparams.teacher_momentum, 1.0, step, total)

    def backbone_frozen(self) -> bool:
        """Whether this training step is one of the head warm-up's (only the heads train)."""
        return self.training and self.global_step < self.hparams.head_warmup_steps

    # -- the step --------------------------------------------------------------------------------

    def _ranks(self) -> dict[str, int]:
        return {"rank": self.global_rank, "world_size": self.trainer.world_size} if self._trainer is not None else {}

    def crops(self, images: Tensor, generator: torch.Generator) -> tuple[list[Tensor], list[Tensor]]:
        """The two global crops and the local crops of ``images``, with DINOv2's photometric views."""
        hp = self.hparams
        ranks = self._ranks()
        global_crops = random_crops(images, 2, hp.img_size, hp.global_crop_scale, generator, **ranks)
        local_crops = random_crops(
            images, hp.num_local_crops, hp.local_crop_size, hp.local_crop_scale, generator, **ranks
        )
        if self.views is None:
            return global_crops, local_crops
        seed = int(torch.randint(2**31, (1,), generator=generator))
        return self.views(global_crops, local_crops, self.mean, self.std, seed, **ranks)

    def masks(self, batch: int, grid: tuple[int, int], generator: torch.Generator) -> Masks:
        hp = self.hparams
        seed = int(torch.randint(2**31, (1,), generator=generator))
        masks = draw_masks(batch, grid, hp.mask_ratio_min_max, hp.mask_sample_probability, seed, **self._ranks())
        return masks.to(self.device)

    def _tokens(self, images: Tensor, masks: Tensor | None = None) -> Tensor:
        """The student's final tokens for ``images``; patches where ``masks`` (B, N) is True get the mask token."""
        if masks is None:
            return self.student.forward_features(images)

        token = self.mask_token
        if token is None:
            raise RegablateError("masked patches need iBOT's mask token (ibot_loss_weight > 0)")

        def replace(module: nn.Module, args: Any, patches: Tensor) -> Tensor:  # (B, H, W, D) or (B, N, D)
            hidden = masks.view(*patches.shape[:-1], 1)
            return torch.where(hidden, token.to(patches.dtype), patches)

        handle = self.student.patch_embed.register_forward_hook(replace)
        try:
            return self.student.forward_features(images)
        finally:
            handle.remove()

    def teacher_targets(self, logits: Tensor, center: Tensor, temperature: float) -> Tensor:
        """The teacher's target distributions for ``logits`` (M, K): Sinkhorn-Knopp, or softmax after centring."""
        hp = self.hparams
        if hp.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temperature, hp.sinkhorn_iterations)
        return F.softmax((logits.float() - center) / temperature, dim=-1)

    def dino_loss(self, student_out: Tensor, teacher_probs: Tensor) -> Tensor:
        """Cross-entropy of every student crop against every other global teacher crop, averaged over the pairs.

        ``student_out`` is (V * B, K) for V crops, the two global ones first; ``teacher_probs`` (2 * B, K).
        """
        teacher = teacher_probs.chunk(2)
        student_logp = F.log_softmax(student_out.float() / self.hparams.student_temp, dim=-1)
        student = student_logp.chunk(student_out.shape[0] // teacher[0].shape[0])
        total, terms = student_out.new_zeros((), dtype=torch.float32), 0
        for t, probs in enumerate(teacher):
            for s, logp in enumerate(student):
                if s != t:
                    total = total - (probs * logp).sum(-1).mean()
                    terms += 1
        return total / terms

    def _koleo(self, cls: Tensor) -> tuple[Tensor, Tensor]:
        """KoLeo over the global batch, per global crop: (its value, the term to back-propagate).

        Every rank sees all ranks' CLS features (its own with their gradient), so the value is the
        one of the whole batch on any number of devices; DDP averages gradients over the ranks, so
        the back-propagated term is the value times the number of ranks.
        """
        world = self.trainer.world_size if self._trainer is not None else 1
        values = []
        for features in cls.chunk(2):  # never between the two crops of an image
            if world > 1:
                gathered = self.all_gather(features.detach())
                features = torch.cat([features if r == self.global_rank else gathered[r] for r in range(world)])
            values.append(koleo_loss(features))
        value = self.hparams.koleo_loss_weight * sum(values)
        return value, value * world

    def _shared_step(self, images: Tensor, step: int, generator: torch.Generator) -> dict[str, Any]:
        hp = self.hparams
        global_crops, local_crops = self.crops(images, generator)
        batch = images.shape[0]
        grid = (hp.img_size // self.student.patch_embed.patch_size[0],) * 2
        masks = self.masks(batch, grid, generator) if self.do_ibot else None
        patches = TokenLayout.of(self.student).patches
        temperature = self.teacher_temperature(step)

        with torch.no_grad():
            tokens = self.backbone.forward_features(torch.cat(global_crops))
            teacher_cls = global_feature(self.backbone, tokens)
            if masks is None:
                teacher_logits = self.teacher_head(teacher_cls)
            else:
                teacher_patches = tokens[:, patches].flatten(0, 1)[masks.indices]
                teacher_logits, teacher_patch_logits = self._heads(
                    teacher_cls, teacher_patches, self.teacher_head, self.teacher_ibot_head
                )
            teacher_probs = self.teacher_targets(teacher_logits, self.center, temperature)
            teacher_patch_probs = (
                self.teacher_targets(teacher_patch_logits, self.ibot_center, temperature) if masks is not None else None
            )

        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen()):
            tokens = self._tokens(torch.cat(global_crops), None if masks is None else masks.masks)
            student_cls = global_feature(self.student, tokens)
            student_patches = tokens[:, patches].flatten(0, 1)[masks.indices] if masks is not None else None
            local_cls = (
                [global_feature(self.student, self.student.forward_features(torch.cat(local_crops)))]
                if local_crops
                else []
            )
        all_cls = torch.cat([student_cls, *local_cls])
        if masks is None or student_patches is None or teacher_patch_probs is None:
            student_out = self.student_head(all_cls)
        else:
            student_out, student_patch_out = self._heads(
                all_cls, student_patches, self.student_head, self.student_ibot_head
            )

        terms = {"DINO": self.dino_loss(student_out, teacher_probs)}
        backward = terms["DINO"]
        if masks is not None and teacher_patch_probs is not None:
            ibot = masked_patch_loss(student_patch_out, teacher_patch_probs, masks.weights, hp.student_temp)
            terms["iBOT"] = hp.ibot_loss_weight * ibot
            backward = backward + terms["iBOT"]
        if hp.koleo_loss_weight > 0:
            terms["KoLeo"], koleo_backward = self._koleo(student_cls)
            backward = backward + koleo_backward
        entropy = -(teacher_probs * teacher_probs.clamp_min(1e-12).log()).sum(-1).mean()
        mean_probs = teacher_probs.mean(0)
        return {
            "loss": backward,
            "terms": terms,
            "total": sum(terms.values()),
            "teacher_logits": teacher_logits,
            "teacher_patch_logits": teacher_patch_logits if masks is not None else None,
            "teacher_temp": torch.tensor(temperature),
            "teacher_entropy": entropy,
            "teacher_batch_entropy": -(mean_probs * mean_probs.clamp_min(1e-12).log()).sum(),
            "feature_std": F.normalize(student_cls.detach(), dim=-1).std(0).mean(),
        }

    @staticmethod
    def _heads(
        cls: Tensor, patches: Tensor, dino_head: nn.Module, ibot_head: nn.Module | None
    ) -> tuple[Tensor, Tensor]:
        """(CLS logits, patch logits): one pass of the DINO head over both, or the iBOT head for the patches."""
        if ibot_head is not None:
            return dino_head(cls), ibot_head(patches)
        out = dino_head(torch.cat([cls, patches]))
        return out[: cls.shape[0]], out[cls.shape[0] :]

    @torch.no_grad()
    def update_centers(self, out: dict[str, Any]) -> None:
        """``centering``: move the DINO and iBOT centres towards this step's mean teacher outputs."""
        if self.hparams.centering != "centering":
            return
        self._update_center(self.center, out["teacher_logits"])
        if out["teacher_patch_logits"] is not None:
            self._update_center(self.ibot_center, out["teacher_patch_logits"])

    def _update_center(self, center: Tensor, logits: Tensor) -> None:
        """EMA of the mean of ``logits`` (M, K) over the global batch (all ranks)."""
        batch_center = logits.float().sum(0, keepdim=True)
        count = torch.tensor(float(logits.shape[0]), device=logits.device)
        if self._trainer is not None:
            batch_center = self.trainer.strategy.reduce(batch_center, reduce_op="sum")
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        m = self.hparams.center_momentum
        center.mul_(m).add_(batch_center / count.clamp(min=1), alpha=1 - m)

    def crop_generator(self, step: int) -> torch.Generator:
        """The random source of a training step's crops, views and masks: the same on every rank, new every step."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return torch.Generator().manual_seed(seed * 1_000_003 + step)

    def require_finite(self, terms: dict[str, Tensor], step: int) -> None:
        """Stop with one line naming the step and the first non-finite term, on every rank at once."""
        bad = torch.stack([~torch.isfinite(value.detach()) for value in terms.values()]).float()
        if self._trainer is not None:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if bad.any():
            name = list(terms)[int(bad.nonzero()[0])]
            raise RegablateError(
                f"non-finite {name} loss ({terms[name].item()}) at step {step}: lower model.init_args.lr, "
                "raise warmup_steps, or check the data for NaNs; last.ckpt is the last checkpoint saved before it"
            )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        step = self.global_step
        out = self._shared_step(batch["image"], step, self.crop_generator(step))
        self.require_finite(out["terms"], step)
        self.update_centers(out)
        # The mean over the global batch (one all-reduce), so N devices log what one device logs.
        self.log("train/loss", out["total"], prog_bar=True, sync_dist=True)
        self.log_dict({f"train/{name.lower()}_loss": value for name, value in out["terms"].items()}, sync_dist=True)
        self.log_dict(
            {f"train/{k}": out[k] for k in ("teacher_temp", "teacher_entropy", "teacher_batch_entropy", "feature_std")}
        )
        if self.backbone_frozen():
            return out["loss"] + zero_gradient_anchor(self._student_parts()[0])
        return out["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """During the head warm-up, drop the backbone's and mask token's (zero) gradients after DDP reduced them.

        A parameter whose ``.grad`` is None is skipped by AdamW: no weight decay, no moment or step
        count, so the backbone stays bit-identical and its optimiser state starts at the first step
        after the warm-up, on one device as on many. Runs before gradient clipping.
        """
        if self.backbone_frozen():
            for param in self._student_parts()[0]:
                param.grad = None

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """After each optimiser step (not each batch, so gradient accumulation is respected), move the teacher."""
        super().optimizer_step(*args, **kwargs)
        momentum = self.teacher_momentum(self.global_step)
        ema_update(self.backbone, self.student, momentum)
        ema_update(self.teacher_head, self.student_head, momentum)
        if self.teacher_ibot_head is not None and self.student_ibot_head is not None:
            ema_update(self.teacher_ibot_head, self.student_ibot_head, momentum)
        self.log("train/teacher_momentum", momentum)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        generator = torch.Generator().manual_seed(batch_idx)  # the same crops, views and masks at every validation
        out = self._shared_step(batch["image"], self.global_step, generator)
        self.log("val/loss", out["total"], prog_bar=True, sync_dist=True)
        self.log("val/teacher_entropy", out["teacher_entropy"], sync_dist=True)


def set_drop_path(model: nn.Module, rate: float, uniform: bool) -> None:
    """Stochastic depth in every block of a timm ViT: ``rate`` in each (DINOv2's uniform rule) or 0 to ``rate``."""
    blocks = list(cast(nn.Module, model.blocks).children())
    rates = [rate] * len(blocks) if uniform else torch.linspace(0, rate, len(blocks)).tolist()
    for block, block_rate in zip(blocks, rates):
        for name in ("drop_path1", "drop_path2"):
            setattr(block, name, DropPath(block_rate) if block_rate > 0 else nn.Identity())
