"""Learning-rate schedules of DINOv2's dense evaluations (mmcv's lr hooks).

mmcv (which DINOv2's mmseg-based evaluations run on) multiplies the regular schedule by a linear
warm-up: at iteration ``t < warmup`` the learning rate is ``regular(t) * (1 - (1 - t / warmup) *
(1 - warmup_ratio))`` (``LrUpdaterHook.get_warmup_lr``, ``warmup="linear"``). The regular schedules:

* poly (``PolyLrUpdaterHook``, segmentation): ``(base - min_lr) * (1 - t / T) ** power + min_lr``;
* cosine (``CosineAnnealingLrUpdaterHook``, depth): from ``base`` to ``base * min_lr_ratio``,
  ``end + (start - end) / 2 * (cos(pi * t / T) + 1)``.

Both are written as the factor on the base learning rate, for ``torch.optim.lr_scheduler.LambdaLR``.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def _warmup(t: int, warmup: int, ratio: float) -> float:
    return 1.0 - (1.0 - t / warmup) * (1.0 - ratio) if t < warmup else 1.0


def warmup_poly(total: int, warmup: int, warmup_ratio: float = 1e-6, power: float = 1.0) -> Callable[[int], float]:
    """Factor of iteration ``t``: linear warm-up over ``warmup`` iterations, then poly decay to 0 over ``total``."""
    return lambda t: (1.0 - min(t, total) / total) ** power * _warmup(t, warmup, warmup_ratio)


def warmup_cosine(
    total: int, warmup: int, warmup_ratio: float = 1e-3, min_lr_ratio: float = 1e-8
) -> Callable[[int], float]:
    """Factor of iteration ``t``: linear warm-up over ``warmup`` iterations, cosine to ``min_lr_ratio`` at ``total``."""

    def factor(t: int) -> float:
        cosine = min_lr_ratio + (1.0 - min_lr_ratio) / 2 * (math.cos(math.pi * min(t, total) / total) + 1)
        return cosine * _warmup(t, warmup, warmup_ratio)

    return factor
