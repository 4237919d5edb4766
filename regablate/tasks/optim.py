"""What every task's optimisation shares: AdamW over parameter groups, warmup + cosine per step, a finite-loss guard.

A parameter group is a dict with ``params`` and optionally ``lr_multiplier`` and ``wd_multiplier``
(its learning rate and weight decay as fractions of the schedule's) and ``frozen_steps`` (steps at
the start during which its learning rate is 0). :func:`weight_decay_groups` is the tasks' default
split (no decay on tokens, position embedding, biases and norms); :func:`dinov2_param_groups` is
DINOv2's (``dinov2/utils/param_groups.py``): layer-wise learning-rate decay, a patch-embedding
multiplier, no decay on biases, norms and LayerScale, and the prototypes' ("last layer") group.
:class:`WarmupCosine` schedules the learning rate (linear warm-up, then cosine) and, where asked,
the weight decay (cosine from its start to its end value, as DINOv2's ``wd_schedule``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torch.optim import AdamW
from torch.optim.lr_scheduler import LRScheduler

from regablate.errors import RegablateError

# How DINOv2 scales its base learning rate (given for a global batch of 1024) with the global batch.
LR_SCALING_RULES = ("sqrt_wrt_1024", "none")


def weight_decay_groups(module: nn.Module) -> list[dict[str, Any]]:
    """Every parameter of ``module`` that trains, in a decayed group and an undecayed one.

    Position embedding, CLS and register tokens (every ``no_weight_decay()`` name of a timm model
    inside ``module``), biases and norm weights get no weight decay.
    """
    skip: set[str] = set()
    for prefix, child in module.named_modules():
        if hasattr(child, "no_weight_decay"):
            skip |= {f"{prefix}.{name}" if prefix else name for name in child.no_weight_decay()}
    groups = param_groups_weight_decay(module, weight_decay=1.0, no_weight_decay_list=skip)
    return [{"params": g["params"], "wd_multiplier": g["weight_decay"]} for g in groups]


# Backbone parameters DINOv2 puts at "layer 0", before the first block (its register_tokens are timm's reg_token).
_EMBEDDING = ("pos_embed", "patch_embed", "mask_token", "cls_token", "reg_token")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def dinov2_param_groups(
    backbone: Iterable[tuple[str, nn.Parameter]],
    heads: Iterable[tuple[str, nn.Parameter]],
    *,
    num_blocks: int,
    layerwise_decay: float,
    patch_embed_lr_mult: float,
    last_layer: str,
    last_layer_frozen_steps: int,
) -> list[dict[str, Any]]:
    """DINOv2's parameter groups of a student: ``backbone`` and ``heads`` as (name, parameter) pairs.

    Backbone parameters get ``layerwise_decay ** (num_blocks + 1 - layer)``, layer 0 being the
    embeddings and tokens (``_EMBEDDING``), layer i + 1 block i, and everything after the blocks
    (the final norm) ``num_blocks + 1``; head parameters get 1. Patch-embedding parameters are
    further multiplied by ``patch_embed_lr_mult``. Biases, norms and LayerScale (``gamma``) get no
    weight decay; everything else does, tokens and position embedding included, as in DINOv2.
    Parameters whose name contains ``last_layer`` learn nothing for ``last_layer_frozen_steps``.
    Parameters that do not train are left out; groups with equal settings are fused.
    """
    fused: dict[tuple[float, float, int], list[nn.Parameter]] = {}

    def add(name: str, param: nn.Parameter, layer: int) -> None:
        if not param.requires_grad:
            return
        lr_mult = layerwise_decay ** (num_blocks + 1 - layer)
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        wd_mult = 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0
        frozen = last_layer_frozen_steps if last_layer in name else 0
        fused.setdefault((lr_mult, wd_mult, frozen), []).append(param)

    for name, param in backbone:
        block = _BLOCK.search(name)
        if any(part in name for part in _EMBEDDING):
            layer = 0
        elif block is not None:
            layer = int(block.group(1)) + 1
        else:
            layer = num_blocks + 1
        add(name, param, layer)
    for name, param in heads:
        add(name, param, num_blocks + 1)
    return [
        {"params": params, "lr_multiplier": lr, "wd_multiplier": wd, "frozen_steps": frozen}
        for (lr, wd, frozen), params in fused.items()
    ]


def scaled_lr(base_lr: float, rule: str, global_batch: int) -> float:
    """DINOv2's learning rate for ``global_batch`` images a step: ``sqrt_wrt_1024`` is ``base * sqrt(batch / 1024)``."""
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch / 1024)
    if rule == "none":
        return base_lr
    raise RegablateError(f"unknown lr scaling rule {rule!r}: use one of {', '.join(LR_SCALING_RULES)}")


class WarmupCosine(LRScheduler):
    """Per step: linear warm-up to each group's peak, cosine to ``min_lr_ratio`` of it; weight decay by cosine.

    A group's peak learning rate is its ``lr`` when the schedule starts (the base times its
    ``lr_multiplier``). The warm-up starts at 1e-3 of the peak. With ``weight_decay_end`` the
    weight decay follows a cosine from ``weight_decay`` at step 0 to ``weight_decay_end`` at
    ``total_steps`` (times each group's ``wd_multiplier``); without, it stays ``weight_decay``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float,
        weight_decay: float,
        weight_decay_end: float | None = None,
    ) -> None:
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        self.weight_decay = weight_decay
        self.weight_decay_end = weight_decay if weight_decay_end is None else weight_decay_end
        super().__init__(optimizer)

    def lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return 1e-3 + (1 - 1e-3) * step / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2

    def weight_decay_at(self, step: int) -> float:
        progress = min(step / self.total_steps, 1.0)
        start, end = self.weight_decay, self.weight_decay_end
        return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2

    def get_lr(self) -> list[float | Tensor]:
        step, factor = self.last_epoch, self.lr_factor(self.last_epoch)
        return [
            0.0 if step < group.get("frozen_steps", 0) else group["initial_lr"] * factor
            for group in self.optimizer.param_groups
        ]

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        decay = self.weight_decay_at(self.last_epoch)
        for group in self.optimizer.param_groups:
            group["weight_decay"] = decay * group.get("wd_multiplier", 1.0)


def adamw_warmup_cosine(
    module: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    total_steps: float,
    min_lr_ratio: float,
    weight_decay_end: float | None = None,
    groups: list[dict[str, Any]] | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
) -> OptimizerLRSchedulerConfig:
    """Lightning's ``configure_optimizers`` answer: AdamW over ``groups`` (default :func:`weight_decay_groups`
    of ``module``), :class:`WarmupCosine` stepping per batch."""
    if not math.isfinite(total_steps):
        raise RegablateError(
            "the learning-rate schedule needs a finite length: set trainer.max_steps or trainer.max_epochs"
        )
    groups = weight_decay_groups(module) if groups is None else groups
    groups = [
        {**group, "lr": lr * group.get("lr_multiplier", 1.0), "weight_decay": weight_decay * group["wd_multiplier"]}
        for group in groups
    ]
    optimizer = AdamW(groups, lr=lr, betas=betas)
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps - 1)
    schedule = WarmupCosine(
        optimizer,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        min_lr_ratio=min_lr_ratio,
        weight_decay=weight_decay,
        weight_decay_end=weight_decay_end,
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def require_finite(loss: Tensor, step: int) -> None:
    """Stop training with a clear message instead of silently training on NaN/inf."""
    if not torch.isfinite(loss).all():
        raise RegablateError(
            f"non-finite loss ({loss.item()}) at step {step}: lower model.lr, raise warmup_steps, "
            "or check the data for NaNs"
        )
