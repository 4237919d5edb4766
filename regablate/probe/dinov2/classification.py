"""DINOv2's linear classification protocol (``dinov2/eval/linear.py``), the backbone in the loop.

Heads: for ``n`` in ``n_last_blocks`` ({1, 4}), ``avgpool`` in {no, yes} and 13 learning rates,
one linear layer on the concatenated (normed) CLS tokens of the last ``n`` blocks, with the mean
patch token of the last block appended when ``avgpool`` (``create_linear_input``): 52 heads,
weights from N(0, 0.01), biases 0. Each learning rate is scaled by the global batch / 256
(``scale_lr``); one SGD (momentum 0.9, no weight decay) with a cosine schedule to 0 trains them
all on the sum of their mean cross-entropies. Every iteration draws a fresh batch of random
resized crops + flips (an infinite shuffled sampler) and runs the frozen backbone once on it;
that one pass feeds all heads (``LinearClassifierGrid``: one batched linear layer). At the end,
every head is scored on val (resize 256 + centre crop 224, top-1 over all samples) and the best,
first in DINOv2's order on ties, is reported on test.

DINOv2 also scores on val every 1,250 iterations; those scores only go to its log, so they are
left out here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.utils.data import DataLoader, Dataset

from regablate.data.common import num_samples
from regablate.errors import RegablateError
from regablate.probe.dinov2.backbone import FrozenBackbone
from regablate.probe.dinov2.data import Views, pad_collate, training_batches
from regablate.probe.dinov2.settings import DINOv2Settings, scaled
from regablate.probe.dinov2.views import ClassificationEvalView, ClassificationTrainView
from regablate.probe.heads import LinearClassifierGrid
from regablate.progress import Progress

INIT_STD = 0.01  # LinearClassifier: weight.normal_(mean=0.0, std=0.01)


def scale_lr(lr: float, batch_size: int) -> float:
    """dinov2's ``scale_lr``: a base learning rate for a global batch of ``batch_size`` images."""
    return lr * batch_size / 256.0


@dataclass(frozen=True)
class Head:
    """One linear head of the grid: its inputs, its learning rate and its name."""

    n_blocks: int
    avgpool: bool
    lr: float  # as given, before scaling
    scaled_lr: float
    name: str


def head_grid(n_last_blocks: Sequence[int], lrs: Sequence[float], batch_size: int) -> list[Head]:
    """The heads in dinov2's order: blocks, then avgpool (False, True), then learning rate.

    Names are dinov2's (``setup_linear_classifiers``: the scaled lr with 5 decimals); where small
    batches make those collide (dinov2's ModuleDict would silently keep one), more decimals.
    """
    specs = [(n, avgpool, float(lr)) for n in n_last_blocks for avgpool in (False, True) for lr in lrs]
    for decimals in range(5, 16):
        names = [
            f"classifier_{n}_blocks_avgpool_{avgpool}_lr_{scale_lr(lr, batch_size):.{decimals}f}".replace(".", "_")
            for n, avgpool, lr in specs
        ]
        if len(set(names)) == len(names):
            break
    else:
        raise RegablateError(f"cls_lrs {list(lrs)} repeat a learning rate; give distinct values")
    return [Head(n, avgpool, lr, scale_lr(lr, batch_size), name) for (n, avgpool, lr), name in zip(specs, names)]


def feature_groups(n_last_blocks: Sequence[int]) -> list[tuple[int, bool]]:
    """The (n_blocks, avgpool) input of each head group, in dinov2's order."""
    return [(n, avgpool) for n in n_last_blocks for avgpool in (False, True)]


def linear_inputs(blocks: list[tuple[Tensor, Tensor]], groups: list[tuple[int, bool]], width: int) -> Tensor:
    """dinov2's ``create_linear_input`` for every group, zero-padded to ``width`` and stacked: (G, B, width).

    ``blocks`` are (patches (B, D, h, w), CLS (B, D)) of the last blocks in block order.
    """
    stacked = []
    for n, avgpool in groups:
        parts = [cls for _, cls in blocks[-n:]]
        if avgpool:
            parts.append(blocks[-1][0].mean(dim=(2, 3)))
        features = torch.cat(parts, dim=-1)
        stacked.append(F.pad(features, (0, width - features.shape[-1])))
    return torch.stack(stacked)


class ClassifierGrid:
    """The heads of the protocol on one backbone: training on fresh views, top-1 of every head."""

    def __init__(self, backbone: FrozenBackbone, settings: DINOv2Settings, num_classes: int) -> None:
        self.backbone, self.settings = backbone, settings
        self.n_last_blocks = [int(n) for n in settings.cls_n_last_blocks]
        self.groups = feature_groups(self.n_last_blocks)
        self.heads = head_grid(self.n_last_blocks, settings.cls_lrs, settings.cls_batch_size)
        self.max_blocks = max(self.n_last_blocks)
        self.width = (self.max_blocks + 1) * backbone.width
        lrs = [scale_lr(float(lr), settings.cls_batch_size) for lr in settings.cls_lrs]  # one per grid column
        self.grid = LinearClassifierGrid(len(self.groups), self.width, num_classes, lrs, INIT_STD).to(backbone.device)

    def inputs(self, images: Tensor) -> Tensor:
        """One backbone pass over ``images``: the stacked inputs of every head group."""
        return linear_inputs(self.backbone.last_blocks(images, self.max_blocks, norm=True), self.groups, self.width)

    def optimizer(self) -> torch.optim.Optimizer:
        """dinov2's SGD (momentum 0.9, no weight decay); the learning rates live in the grid's loss weights."""
        return torch.optim.SGD(self.grid.parameters(), lr=1.0, momentum=0.9, weight_decay=0.0, fused=True)

    def step(self, batch: dict[str, Tensor], optimizer: torch.optim.Optimizer) -> Tensor:
        """One iteration: one backbone pass over the batch feeds every head; returns the heads' summed loss."""
        labels = batch["label"].to(self.backbone.device, non_blocking=True)
        losses = self.grid.head_losses(self.inputs(batch["image"]), labels)
        optimizer.zero_grad(set_to_none=False)  # reuse the gradient buffers (400 MB at ViT-S, 1000 classes)
        self.grid.weighted(losses).backward()
        optimizer.step()
        return losses.detach().sum()  # dinov2 logs the unweighted sum

    def train(self, views: Dataset, seed: int, num_workers: int) -> None:
        iterations = self.settings.cls_iterations
        optimizer = self.optimizer()
        cosine = CosineAnnealingLR(optimizer, T_max=iterations, eta_min=0)
        batches = training_batches(
            views, self.settings.cls_batch_size, seed, num_workers, self.backbone.device.type == "cuda"
        )
        progress = Progress("probe: dinov2 cls", iterations, unit="iterations")
        self.grid.train()
        for _ in range(iterations):
            self.step(next(batches), optimizer)
            cosine.step()
            progress.update(1)
        progress.finish()

    @torch.no_grad()
    def top1(self, views: Dataset, num_workers: int) -> Tensor:
        """Top-1 of every head (G, L) over ``views``; a head with non-finite logits (diverged) scores -1."""
        self.grid.eval()
        correct = torch.zeros(self.grid.weight.shape[:2], dtype=torch.long)
        finite = torch.ones(self.grid.weight.shape[:2], dtype=torch.bool)
        loader = DataLoader(
            views, batch_size=self.settings.eval_batch_size, num_workers=num_workers, collate_fn=pad_collate
        )
        for batch in loader:
            logits = self.grid(self.inputs(batch["image"]))  # (G, L, B, C)
            labels = batch["label"].to(logits.device, non_blocking=True)
            finite &= torch.isfinite(logits).flatten(2).all(dim=-1).cpu()
            correct += (logits.argmax(dim=-1) == labels).sum(dim=-1).cpu()
        top1 = correct.double() / num_samples(views)
        return torch.where(finite, top1, torch.full_like(top1, -1.0)).float()


def classify(
    backbone: FrozenBackbone,
    raw: dict[str, Dataset],
    settings: DINOv2Settings,
    *,
    num_classes: int,
    scale: float,
    normalisation: tuple[Sequence[float], Sequence[float]],
    seed: int,
    num_workers: int,
    scored_on: str = "test",
) -> tuple[dict, dict]:
    """Train the head grid on ``raw["train"]``, pick the best on val, score it on ``scored_on``: (metrics, protocol).

    Scored on val (data without a test split), the selected head's val top-1 is the score
    (``probe/cls_val_top1``, no ``probe/cls_top1``), as the fast protocol reports it.
    """
    crop, resize = scaled(settings.cls_crop_size, scale), scaled(settings.cls_resize_size, scale)
    mean, std = normalisation
    heads = ClassifierGrid(backbone, settings, num_classes)
    heads.train(Views(raw["train"], ClassificationTrainView(crop, mean, std)), seed, num_workers)
    evaluate = ClassificationEvalView(resize, crop, mean, std)
    val = heads.top1(Views(raw["val"], evaluate), num_workers)
    best = int(val.flatten().argmax())  # torch.argmax: the first maximum, as dinov2's strict ">" keeps the first
    group, lr_index = divmod(best, val.shape[1])
    test = heads.top1(Views(raw["test"], evaluate), num_workers)[group, lr_index] if scored_on == "test" else None
    chosen = heads.heads[best]
    features = f"{chosen.n_blocks} block{'s' if chosen.n_blocks > 1 else ''}{' + avgpool' if chosen.avgpool else ''}"
    metrics = {
        **({"probe/cls_top1": float(test)} if test is not None else {}),
        "probe/cls_val_top1": float(val[group, lr_index]),
        "probe/cls_lr": chosen.scaled_lr,
        "probe/cls_features": features,
        "probe/cls_iterations": int(settings.cls_iterations),
    }
    protocol = {
        "heads": len(heads.heads),
        "features": "CLS of the last n blocks (after the final norm), + the last block's mean patch token (avgpool)",
        "init": f"weights N(0, {INIT_STD}), biases 0",
        "optimizer": "SGD momentum 0.9, no weight decay, cosine to 0; lr = base lr x batch / 256",
        "loss": "sum over heads of each head's mean cross-entropy",
        "train_view": f"RandomResizedCrop({crop}, bicubic) + horizontal flip, fresh every iteration",
        "eval_view": f"Resize({resize}, bicubic) + CenterCrop({crop})",
        "iterations": int(settings.cls_iterations),
        "batch_size": int(settings.cls_batch_size),
        "selected": {
            "name": chosen.name,
            "n_blocks": chosen.n_blocks,
            "avgpool": chosen.avgpool,
            "lr": chosen.lr,
            "scaled_lr": chosen.scaled_lr,
            "val_top1": float(val[group, lr_index]),
            **({"test_top1": float(test)} if test is not None else {}),
        },
        "val_top1": {head.name: float(score) for head, score in zip(heads.heads, val.flatten().tolist())},
    }
    return metrics, protocol
