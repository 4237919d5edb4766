"""The loop every linear head here trains with: minimise a loss over shuffled mini-batches of sample indices.

Shared by the probes (``regablate.probe.heads``) and the token probes (``regablate.artifacts.token_probes``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR

from regablate.progress import Progress


@dataclass(frozen=True)
class Schedule:
    """How long and in what mini-batches a head trains: ``steps`` steps of cosine decay.

    A step count rather than epochs (as DINOv2's linear evaluation counts iterations): the
    cost stays fixed for large datasets and small ones still get enough updates.
    """

    steps: int
    batch_size: int
    seed: int = 0


def train_head(
    optimizer: Optimizer, loss_of: Callable[[Tensor], Tensor], num_samples: int, schedule: Schedule, label: str
) -> None:
    """Minimise ``loss_of(indices)`` over shuffled mini-batches of sample indices (seeded epochs).

    ``label`` names the head in the progress lines (``probe: cls head: 300/1000 ..., ETA 12 s``).
    """
    total = schedule.steps
    progress = Progress(label, total, unit="steps")
    cosine = CosineAnnealingLR(optimizer, T_max=total)
    order = torch.Generator().manual_seed(schedule.seed)
    step = 0
    while step < total:
        for indices in torch.randperm(num_samples, generator=order).split(schedule.batch_size)[: total - step]:
            loss = loss_of(indices)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            cosine.step()
            step += 1
            progress.update()
    progress.finish()
