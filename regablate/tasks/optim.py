"""What every task's optimisation shares: AdamW without decay on tokens, warmup + cosine, a finite-loss guard."""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torch.optim import AdamW
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from regablate.errors import RegablateError


def adamw_warmup_cosine(
    module: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    total_steps: float,
    min_lr_ratio: float,
    betas: tuple[float, float] = (0.9, 0.999),
) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer for ``module``, stepping the schedule per batch.

    Position embedding, CLS and register tokens (every ``no_weight_decay()`` name of a timm
    model inside ``module``), biases and norm weights get no weight decay.
    """
    skip: set[str] = set()
    for prefix, child in module.named_modules():
        if hasattr(child, "no_weight_decay"):
            skip |= {f"{prefix}.{name}" if prefix else name for name in child.no_weight_decay()}
    groups = param_groups_weight_decay(module, weight_decay=weight_decay, no_weight_decay_list=skip)
    optimizer = AdamW(groups, lr=lr, betas=betas)
    if not math.isfinite(total_steps):
        raise RegablateError(
            "the learning-rate schedule needs a finite length: set trainer.max_steps or trainer.max_epochs"
        )
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps - 1)
    cosine = CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps, eta_min=lr * min_lr_ratio)
    if warmup_steps:
        warmup = LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=warmup_steps)
        schedule: Any = SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])
    else:
        schedule = cosine
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def require_finite(loss: Tensor, step: int) -> None:
    """Stop training with a clear message instead of silently training on NaN/inf."""
    if not torch.isfinite(loss).all():
        raise RegablateError(
            f"non-finite loss ({loss.item()}) at step {step}: lower model.lr, raise warmup_steps, "
            "or check the data for NaNs"
        )
