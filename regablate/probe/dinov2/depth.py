"""DINOv2's linear depth protocol (NYUd "lin. 1"): ``BNHead`` of ``dinov2/eval/depth`` and its NYUd config.

Head (``decode_heads/linear_head.py`` ``BNHead(classify=True, n_bins=256, bins_strategy="UD",
norm_strategy="linear", upsample=4)``, its BatchNorm commented out there): the last block's patch
tokens and CLS token *before* the final norm (``dinov2/hub/depthers.py``: ``norm=False``), CLS
broadcast over the grid and concatenated ([patch, CLS], 2D channels), upsampled x4 bilinearly, a 1x1
convolution to 256 bins; the "linear" normalisation ``p = (relu(logit) + 0.1) / sum(relu(logit) + 0.1)``
(``decode_head.py`` ``depth_pred``), depth ``sum_k p_k bin_k`` with ``bin_k = linspace(min_depth,
max_depth, 256)``. The convolution runs before the upsampling here: both are linear and bilinear
weights sum to one, so the logits are the same, at a fraction of the cost when 2D > 256.

Training (the NYUd/KITTI ``linear`` configs): SigLoss (AdaBins' scale-invariant log loss, with its
100-iteration warm-up on the mean term) of the prediction resized bilinearly to the label crop,
AdamW (lr 1e-4, weight decay 0.01), linear warm-up over a third of the 38,400 iterations then cosine
to 1e-8 of the lr, gradient norm clipped at 35. The config's GradientLoss (weight 0.5) is left out:
as written it indexes the batch and channel axes of its (B, 1, H, W) inputs, so at the 2 images per
GPU those runs used it is exactly 0. Scoring: the whole image (padded to the patch size), the
prediction clamped to [min_depth, max_depth], resized to the ground truth and averaged with that of
the mirrored image; RMSE per image over the Eigen crop where ``min_depth < gt < max_depth``, averaged
over images (the toolbox's ``metrics`` and ``pre_eval_to_metrics``). The Eigen crop is the data's:
``scripts/prepare_nyud.py`` writes the test split with depth 0 (no ground truth) outside it
(``regablate.data.nyud``), and only pixels with a ground truth are scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import Dataset

from regablate.probe.dinov2.backbone import FrozenBackbone
from regablate.probe.dinov2.data import Views, evaluation_batches, same_size_groups, training_batches
from regablate.probe.dinov2.schedules import warmup_cosine
from regablate.probe.dinov2.settings import DINOv2Settings, scaled
from regablate.probe.dinov2.views import DepthEvalView, DepthTrainView
from regablate.probe.heads import valid_depth
from regablate.probe.protocol import scored_key
from regablate.progress import Progress

UPSAMPLE = 4
LINEAR_EPS = 0.1  # depth_pred, norm_strategy "linear"
SIGLOSS_EPS = 0.001  # SigLoss.eps, "avoid grad explode"


def uniform_bins(min_depth: float, max_depth: float, num_bins: int) -> Tensor:
    """bins_strategy "UD": ``torch.linspace(min_depth, max_depth, n_bins)``, the depth each bin stands for."""
    return torch.linspace(min_depth, max_depth, num_bins)


def linear_normalise(logits: Tensor, dim: int = 1) -> Tensor:
    """norm_strategy "linear": ``relu(logits) + 0.1``, divided by its sum over the bins."""
    positive = torch.relu(logits) + LINEAR_EPS
    return positive / positive.sum(dim=dim, keepdim=True)


def sigloss(prediction: Tensor, target: Tensor, mean_only: bool = False) -> Tensor:
    """dinov2's ``SigLoss`` (valid_mask: target > 0): ``sqrt(var(g) + 0.15 mean(g)^2)``.

    ``g = log(pred + eps) - log(gt + eps)`` over the known pixels.

    ``mean_only`` is its warm-up form, ``sqrt(0.15 mean(g)^2)``. ``var`` is torch's unbiased one.
    """
    valid = target > 0
    g = torch.log(prediction[valid] + SIGLOSS_EPS) - torch.log(target[valid] + SIGLOSS_EPS)
    if mean_only:
        return torch.sqrt(0.15 * g.mean() ** 2)
    return torch.sqrt(g.var() + 0.15 * g.mean() ** 2)


def grouped_sigloss(prediction: Tensor, target: Tensor, group: int, mean_only: bool) -> Tensor | None:
    """The mean SigLoss over consecutive groups of ``group`` images (per-GPU losses averaged by DDP in dinov2's
    runs); groups with fewer than 2 known pixels are left out; ``None`` when no group has them."""
    losses = [
        sigloss(p, t, mean_only)
        for p, t in zip(prediction.split(group), target.split(group))
        if int((t > 0).sum()) >= 2
    ]
    return torch.stack(losses).mean() if losses else None


class LinearDepthHead(nn.Module):
    """[patch, CLS] -> x4 upsampling -> 1x1 conv to bins -> linear normalisation -> expected depth."""

    def __init__(self, width: int, bins: Tensor) -> None:
        super().__init__()
        self.width = width
        self.conv_depth = nn.Conv2d(2 * width, len(bins), kernel_size=1)  # PyTorch's default init, as dinov2's
        self.register_buffer("bins", bins)

    def bin_logits(self, patches: Tensor, cls: Tensor) -> Tensor:
        """(B, D, h, w), (B, D) -> logits (B, bins, h, w) of conv_depth on [patch, CLS broadcast].

        The CLS half of the convolution is computed once per image, not once per patch.
        """
        weight = self.conv_depth.weight[:, :, 0, 0]
        logits = F.conv2d(patches, weight[:, : self.width, None, None], self.conv_depth.bias)
        return logits + (cls @ weight[:, self.width :].T)[:, :, None, None]

    def forward(self, patches: Tensor, cls: Tensor) -> Tensor:
        """(B, D, h, w), (B, D) -> depth (B, 1, 4h, 4w)."""
        logits = self.bin_logits(patches, cls)
        logits = F.interpolate(
            logits, size=[s * UPSAMPLE for s in logits.shape[-2:]], mode="bilinear", align_corners=False
        )
        return torch.einsum("ikmn,k->imn", linear_normalise(logits), self.bins).unsqueeze(1)


def image_rmse(prediction: Tensor, truth: Tensor, min_depth: float, max_depth: float) -> float:
    """RMSE of one image over the pixels with a ground truth (the data's ``valid_depth``: a prepared NYUd test
    split is 0 outside the Eigen crop) in (min_depth, max_depth) (the toolbox's eval range); NaN without any."""
    keep = valid_depth(truth) & (truth > min_depth) & (truth < max_depth)
    if not keep.any():
        return math.nan
    return float((truth[keep] - prediction[keep]).square().mean().sqrt())


class DepthProbe:
    """The linear depth head trained on random crops through the frozen backbone, scored at the truth's resolution."""

    def __init__(self, backbone: FrozenBackbone, settings: DINOv2Settings, scale: float) -> None:
        self.backbone, self.settings = backbone, settings
        self.crop = (scaled(settings.depth_crop_size[0], scale), scaled(settings.depth_crop_size[1], scale))
        bins = uniform_bins(settings.depth_min, settings.depth_max, settings.depth_bins)
        self.head = LinearDepthHead(backbone.width, bins).to(backbone.device)

    def depth(self, images: Tensor) -> Tensor:
        """Normalised images (B, 3, H, W) -> depth (B, 1, 4h, 4w) of the padded input's patch grid."""
        patches, cls = self.backbone.last_blocks(images, 1, norm=False)[-1]
        return self.head(patches, cls)

    def train(
        self, raw: Dataset, normalisation: tuple[Sequence[float], Sequence[float]], seed: int, workers: int
    ) -> None:
        settings = self.settings
        views = Views(raw, DepthTrainView(settings.depth_train_crop, self.crop, *normalisation))
        iterations = settings.depth_iterations
        optimizer = torch.optim.AdamW(
            self.head.parameters(), lr=settings.depth_lr, betas=(0.9, 0.999), weight_decay=settings.depth_weight_decay
        )
        schedule = LambdaLR(optimizer, warmup_cosine(iterations, round(settings.depth_warmup * iterations)))
        loss_warmup = round(settings.depth_loss_warmup * iterations)
        batches = training_batches(views, settings.depth_batch_size, seed, workers, self.backbone.device.type == "cuda")
        progress = Progress("probe: dinov2 depth", iterations, unit="iterations")
        self.head.train()
        for iteration in range(1, iterations + 1):
            batch = next(batches)
            progress.update(1)
            truth = batch["depth"].to(self.backbone.device, non_blocking=True)[:, None]
            prediction = F.interpolate(
                self.depth(batch["image"]), size=truth.shape[-2:], mode="bilinear", align_corners=False
            )
            loss = grouped_sigloss(prediction, truth, settings.depth_loss_group, mean_only=iteration <= loss_warmup)
            if loss is None:  # no known depth in the batch: nothing to learn from
                schedule.step()
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.head.parameters(), settings.depth_grad_clip)
            optimizer.step()
            schedule.step()
        progress.finish()

    @torch.no_grad()
    def predict(self, images: Tensor, size: tuple[int, int]) -> Tensor:
        """Depth (B, H, W) at ``size``: clamped, resized (and averaged with the mirrored image's when set)."""
        settings = self.settings

        def once(batch: Tensor) -> Tensor:
            depth = self.depth(batch).clamp(settings.depth_min, settings.depth_max)
            return F.interpolate(depth, size=size, mode="bilinear", align_corners=False)[:, 0]

        depth = once(images)
        if settings.depth_flip_test:
            depth = (depth + once(images.flip(-1)).flip(-1)) / 2
        return depth

    @torch.no_grad()
    def rmse(
        self, raw: Dataset, normalisation: tuple[Sequence[float], Sequence[float]], workers: int
    ) -> tuple[float, int]:
        """Mean over images of the per-image RMSE, and the number of images scored."""
        self.head.eval()
        settings = self.settings
        scores = []
        for samples in evaluation_batches(Views(raw, DepthEvalView(*normalisation)), settings.eval_batch_size, workers):
            for group in same_size_groups([s["image"] for s in samples]):
                sizes = {tuple(samples[i]["depth"].shape) for i in group}
                for size in sizes:
                    members = [i for i in group if tuple(samples[i]["depth"].shape) == size]
                    predictions = self.predict(torch.stack([samples[i]["image"] for i in members]), size).cpu()
                    scores += [
                        image_rmse(p, samples[i]["depth"], settings.depth_min, settings.depth_max)
                        for i, p in zip(members, predictions)
                    ]
        known = [s for s in scores if not math.isnan(s)]
        return (sum(known) / len(known) if known else math.nan), len(known)


def estimate_depth(
    backbone: FrozenBackbone,
    raw: dict[str, Dataset],
    settings: DINOv2Settings,
    *,
    scale: float,
    normalisation: tuple[Sequence[float], Sequence[float]],
    seed: int,
    num_workers: int,
    scored_on: str = "test",
) -> tuple[dict, dict]:
    """Train the linear depth head on ``raw["train"]`` and score RMSE on ``raw[scored_on]``: (metrics, protocol)."""
    probe = DepthProbe(backbone, settings, scale)
    probe.train(raw["train"], normalisation, seed, num_workers)
    rmse, images = probe.rmse(raw[scored_on], normalisation, num_workers)
    metrics = {
        scored_key("depth", "rmse", scored_on): rmse,
        "probe/depth_lr": float(settings.depth_lr),
        "probe/depth_iterations": int(settings.depth_iterations),
        "probe/depth_bins": int(settings.depth_bins),
    }
    protocol = {
        "features": "[patch, CLS] of the last block before the final norm",
        "head": (
            f"x{UPSAMPLE} bilinear upsampling, 1x1 conv to {settings.depth_bins} bins uniform in "
            f"[{settings.depth_min}, {settings.depth_max}], linear normalisation (relu + {LINEAR_EPS}), expected depth"
        ),
        "loss": (
            f"SigLoss per {settings.depth_loss_group} images, mean term only for the first "
            f"{round(settings.depth_loss_warmup * settings.depth_iterations)} iterations"
        ),
        "optimizer": (
            f"AdamW lr {settings.depth_lr} weight decay {settings.depth_weight_decay}, linear warm-up "
            f"{round(settings.depth_warmup * settings.depth_iterations)} iterations, cosine to 1e-8 x lr, "
            f"grad norm clip {settings.depth_grad_clip}"
        ),
        "train_view": (
            f"frame crop {settings.depth_train_crop}, rotate +-2.5 deg (p 0.5), flip, RandomCrop{probe.crop}, "
            "colour aug (p 0.5)"
        ),
        "score": (
            "RMSE per image at the ground truth's resolution over its valid pixels (the data's: NYUd's test split "
            f"is 0 outside the Eigen crop) where {settings.depth_min} < depth < {settings.depth_max}, "
            f"mean over {images} images"
            + (", prediction averaged with the mirrored image's" if settings.depth_flip_test else "")
        ),
        "iterations": int(settings.depth_iterations),
        "batch_size": int(settings.depth_batch_size),
    }
    return metrics, protocol
