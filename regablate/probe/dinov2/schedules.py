"""Learning-rate schedules of DINOv2's dense evaluations (mmcv's lr hooks), and progress lines with an ETA.

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
import time
from collections.abc import Callable

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor


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


class Progress:
    """Lines like ``dinov2 seg: 2000/40000 iterations (5%), loss 1.234, 3.1 it/s, ETA 3h24m`` about 20 times a run."""

    def __init__(self, name: str, total: int, lines: int = 20) -> None:
        self.name, self.total = name, total
        self.every = max(1, total // lines)
        self.started = time.perf_counter()

    def step(self, done: int, loss: Tensor) -> None:
        """Report after iteration ``done`` (1-based) when it is due (only then is ``loss`` read: no device sync)."""
        if done % self.every and done != self.total:
            return
        loss = float(loss.detach())
        elapsed = time.perf_counter() - self.started
        rate = done / elapsed if elapsed > 0 else float("inf")
        left = (self.total - done) / rate if rate > 0 else 0.0
        rank_zero_info(
            f"dinov2 {self.name}: {done}/{self.total} iterations ({done / self.total:.0%}), loss {loss:.4g}, "
            f"{rate:.2f} it/s, ETA {_duration(left)}"
        )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
