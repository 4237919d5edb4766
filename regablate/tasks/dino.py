"""DINO self-distillation with registers: the paper's training recipe, from scratch or continued.

A student ViT with R registers and an EMA teacher each end in a DINO head (MLP, then a
weight-normalised layer of prototypes). The teacher sees the two global crops of an image, the
student those and ``num_local_crops`` small ones; the student learns to predict the teacher's
centred, sharpened distribution over prototypes for every other crop. Local crops are smaller
images: the backbone resamples its patch position embedding for them (timm's antialiased
bicubic interpolation, ``dynamic_img_size``). Multi-crop runs on the batch tensor with
``roi_align`` (one random box per image and crop), so any data module that yields ``image``
works. This is DINO's image-level loss; DINOv2's iBOT patch loss and KoLeo are not included.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm
from torchvision.ops import roi_align

from regablate.errors import RegablateError
from regablate.models.backbone import global_feature
from regablate.tasks.base import BackboneTask
from regablate.tasks.optim import require_finite

# A crop's area as a fraction of the image.
CropScale = restricted_number_type("CropScale", float, [(">", 0), ("<=", 1)], docstring="a fraction in (0, 1]")


class DINOHead(nn.Module):
    """MLP to a bottleneck, L2 normalisation, then weight-normalised prototypes (unit norm, frozen)."""

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
        magnitude = self.prototypes.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        magnitude.requires_grad_(False)

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
    teacher_params = list(teacher.parameters())
    student_params = list(student.parameters())
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)


def zero_gradient_anchor(module: nn.Module) -> Tensor:
    """``0 * sum(p.sum())`` over the parameters of ``module`` that train: a zero term for the loss.

    Under DDP (``find_unused_parameters=False``) every trainable parameter must receive a
    gradient each step, or the reducer fails at the next one. During the head warm-up the
    backbone runs without autograd (no activations kept, no backward through it); this term gives
    each of its parameters a zero gradient at the cost of one sum per tensor, instead of DDP's
    ``find_unused_parameters=True``, which walks the autograd graph every step of the whole run.
    """
    trainable = [param.sum() for param in module.parameters() if param.requires_grad]
    return torch.stack(trainable).sum() * 0.0 if trainable else torch.zeros(())


class DINO(BackboneTask):
    """Self-distillation with an EMA teacher and multi-crop (Caron et al. 2021), with R registers.

    ``self.backbone`` is the EMA teacher's backbone, the model DINO evaluates and the one a
    checkpoint of this task gives to ``build_backbone(checkpoint=...)``; ``self.student`` is
    trained by AdamW. Logs ``train/loss``, ``train/teacher_momentum``, ``train/teacher_temp``
    and two collapse signals: ``train/teacher_entropy`` (mean entropy of the teacher's
    distributions, in nats; it tends to log(out_dim) when outputs go uniform) and
    ``train/teacher_batch_entropy`` (entropy of the batch-mean distribution; it tends to 0 when
    every image maps to one prototype), plus ``train/feature_std`` (std of the student's CLS
    features over the batch). Validation logs ``val/loss`` on fixed crops.
    """

    def __init__(
        self,
        out_dim: PositiveInt = 4096,
        hidden_dim: PositiveInt = 1024,
        bottleneck_dim: PositiveInt = 256,
        num_local_crops: NonNegativeInt = 6,
        local_crop_size: PositiveInt = 96,
        global_crop_scale: tuple[CropScale, CropScale] = (0.4, 1.0),
        local_crop_scale: tuple[CropScale, CropScale] = (0.05, 0.4),
        student_temp: PositiveFloat = 0.1,
        teacher_temp: PositiveFloat = 0.07,
        warmup_teacher_temp: PositiveFloat = 0.04,
        warmup_teacher_temp_steps: NonNegativeInt = 100,
        center_momentum: ClosedUnitInterval = 0.9,
        teacher_momentum: ClosedUnitInterval = 0.996,
        head_warmup_steps: NonNegativeInt = 0,
        lr: PositiveFloat = 5e-4,
        weight_decay: NonNegativeFloat = 0.04,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            out_dim: number of prototypes K.
            hidden_dim: width of the head's MLP.
            bottleneck_dim: width before the prototypes.
            num_local_crops: small crops per image seen by the student only.
            local_crop_size: side of a local crop in pixels (a multiple of the patch size).
            global_crop_scale: area range (low, high) of the two global crops, as a fraction of the image.
            local_crop_scale: area range of the local crops.
            student_temp: student softmax temperature.
            teacher_temp: teacher temperature after its warmup.
            warmup_teacher_temp: teacher temperature at step 0, raised linearly to ``teacher_temp``.
            warmup_teacher_temp_steps: steps of that warmup.
            center_momentum: EMA momentum of the teacher's output centre.
            teacher_momentum: EMA momentum of the teacher at step 0, raised to 1 by a cosine.
            head_warmup_steps: steps during which only the heads train (the backbone stays frozen);
                use it when continuing from a checkpoint, since the heads start from scratch.
            lr: peak AdamW learning rate (the recipe's default).
            weight_decay: AdamW weight decay (none on tokens, position embedding, biases, norms).
            **kwargs: the other backbone and optimiser arguments of ``BackboneTask``; with
                ``checkpoint`` or ``pretrained`` training continues from those weights (any register
                count) and the heads start from scratch; ``img_size`` is the global crop side.
        """
        super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)

    def configure_models(self) -> None:
        hp = self.hparams
        self.student = self.make_backbone(dynamic_img_size=True)
        patch = self.student.patch_embed.patch_size[0]
        if hp.local_crop_size % patch or hp.num_local_crops < 0:
            raise RegablateError(
                f"local_crop_size {hp.local_crop_size} must be a multiple of the patch size {patch} "
                f"and num_local_crops >= 0 (got {hp.num_local_crops})"
            )
        for name in ("global_crop_scale", "local_crop_scale"):
            low, high = hp[name]
            if low > high:
                raise RegablateError(f"{name} is an area range (low, high) with low <= high, got {tuple(hp[name])}")
        heads = (self.student.embed_dim, hp.out_dim, hp.hidden_dim, hp.bottleneck_dim)
        self.student_head = DINOHead(*heads)
        self.backbone = self.make_backbone(weights=False, dynamic_img_size=True)
        self.backbone.load_state_dict(self.student.state_dict())
        self.teacher_head = DINOHead(*heads)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        self.backbone.requires_grad_(False)
        self.teacher_head.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, hp.out_dim))

    def train(self, mode: bool = True) -> DINO:
        super().train(mode)
        self.backbone.eval()
        self.teacher_head.eval()
        return self

    def teacher_temperature(self, step: int) -> float:
        hp = self.hparams
        if step >= hp.warmup_teacher_temp_steps:
            return hp.teacher_temp
        return hp.warmup_teacher_temp + (hp.teacher_temp - hp.warmup_teacher_temp) * step / hp.warmup_teacher_temp_steps

    def teacher_momentum(self, step: int) -> float:
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        return cosine_schedule(self.hparams.teacher_momentum, 1.0, step, total)

    def crops(self, images: Tensor, generator: torch.Generator) -> tuple[list[Tensor], list[Tensor]]:
        hp = self.hparams
        ranks = {"rank": self.global_rank, "world_size": self.trainer.world_size} if self._trainer is not None else {}
        global_crops = random_crops(images, 2, hp.img_size, hp.global_crop_scale, generator, **ranks)
        local_crops = random_crops(
            images, hp.num_local_crops, hp.local_crop_size, hp.local_crop_scale, generator, **ranks
        )
        return global_crops, local_crops

    def backbone_frozen(self) -> bool:
        """Whether this training step is one of the head warm-up's (only the heads train)."""
        return self.training and self.global_step < self.hparams.head_warmup_steps

    def _student_out(self, global_crops: list[Tensor], local_crops: list[Tensor]) -> tuple[Tensor, Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen()):
            cls = [self._global(self.student, torch.cat(group)) for group in (global_crops, local_crops) if group]
        cls = torch.cat(cls)
        return self.student_head(cls), cls

    @staticmethod
    def _global(backbone: nn.Module, images: Tensor) -> Tensor:
        """The DINO heads' input: the CLS token, or the pooled feature of a ViT without one."""
        return global_feature(backbone, backbone.forward_features(images))

    def dino_loss(self, student_out: Tensor, teacher_out: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """Cross-entropy of every student crop against every other global teacher crop.

        ``student_out`` is (V * B, K) for V crops, the two global ones first; ``teacher_out``
        (2 * B, K). Returns the loss and the teacher probabilities.
        """
        teacher_probs = F.softmax((teacher_out - self.center) / temperature, dim=-1).chunk(2)
        student_logp = F.log_softmax(student_out / self.hparams.student_temp, dim=-1).chunk(
            student_out.shape[0] // teacher_probs[0].shape[0]
        )
        total, terms = student_out.new_zeros(()), 0
        for t, probs in enumerate(teacher_probs):
            for s, logp in enumerate(student_logp):
                if s != t:
                    total = total - (probs * logp).sum(-1).mean()
                    terms += 1
        return total / terms, torch.cat(teacher_probs)

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """EMA of the teacher's mean output over the global batch (all ranks)."""
        batch_center = teacher_out.sum(0, keepdim=True)
        count = torch.tensor(float(teacher_out.shape[0]), device=teacher_out.device)
        if self._trainer is not None:
            batch_center = self.trainer.strategy.reduce(batch_center, reduce_op="sum")
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        m = self.hparams.center_momentum
        self.center.mul_(m).add_(batch_center / count, alpha=1 - m)

    def crop_generator(self, step: int) -> torch.Generator:
        """The random source of a training step's crops: the same on every rank, new every step."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return torch.Generator().manual_seed(seed * 1_000_003 + step)

    def _shared_step(self, images: Tensor, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        global_crops, local_crops = self.crops(images, generator)
        with torch.no_grad():
            teacher_out = self.teacher_head(self._global(self.backbone, torch.cat(global_crops)))
        student_out, student_cls = self._student_out(global_crops, local_crops)
        temperature = self.teacher_temperature(step)
        loss, probs = self.dino_loss(student_out, teacher_out, temperature)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        mean_probs = probs.mean(0)
        batch_entropy = -(mean_probs * mean_probs.clamp_min(1e-12).log()).sum()
        return {
            "loss": loss,
            "teacher_out": teacher_out,
            "teacher_temp": torch.tensor(temperature),
            "teacher_entropy": entropy,
            "teacher_batch_entropy": batch_entropy,
            "feature_std": F.normalize(student_cls.detach(), dim=-1).std(0).mean(),
        }

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self._shared_step(batch["image"], self.global_step, self.crop_generator(self.global_step))
        require_finite(out["loss"], self.global_step)
        self.update_center(out["teacher_out"])
        # The mean over the global batch (one scalar all-reduce), so N devices log what one device logs.
        self.log("train/loss", out["loss"], prog_bar=True, sync_dist=True)
        self.log_dict(
            {f"train/{k}": out[k] for k in ("teacher_temp", "teacher_entropy", "teacher_batch_entropy", "feature_std")}
        )
        if self.backbone_frozen():
            return out["loss"] + zero_gradient_anchor(self.student)
        return out["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """During the head warm-up, drop the backbone's (zero) gradients after DDP has reduced them.

        A parameter whose ``.grad`` is None is skipped by AdamW: no weight decay, no moment or step
        count, so the backbone stays bit-identical and its optimiser state starts at the first step
        after the warm-up, on one device as on many. Runs before gradient clipping.
        """
        if self.backbone_frozen():
            for param in self.student.parameters():
                param.grad = None

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """After each optimiser step (not each batch, so gradient accumulation is respected), move the teacher."""
        super().optimizer_step(*args, **kwargs)
        momentum = self.teacher_momentum(self.global_step)
        ema_update(self.backbone, self.student, momentum)
        ema_update(self.teacher_head, self.student_head, momentum)
        self.log("train/teacher_momentum", momentum)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        generator = torch.Generator().manual_seed(batch_idx)  # the same crops at every validation
        out = self._shared_step(batch["image"], self.global_step, generator)
        self.log("val/loss", out["loss"], prog_bar=True, sync_dist=True)
        self.log("val/teacher_entropy", out["teacher_entropy"], sync_dist=True)
