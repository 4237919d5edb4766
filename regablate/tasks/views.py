"""DINOv2's photometric views of the multi-crops, per image, on the batch tensor, on its device.

DINOv2 (``dinov2/data/augmentations.py``) distorts each crop after cropping and flipping, in this
order: colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with p 0.8, grayscale
with p 0.2, Gaussian blur (9 x 9 kernel, sigma uniform in [0.1, 2.0]), and on the second global
crop solarisation (threshold 128 of 255) with p 0.2; then it normalises.

Its blur probabilities are written 1.0 / 0.1 / 0.5 (first global crop, second, local crops), but
its ``GaussianBlur`` hands ``1 - p`` to torchvision's ``RandomApply``, which applies with the
probability it is given: the code DINOv2's models were trained with blurs the first global crop
never, the second with p 0.9 and the local crops with p 0.5 (facebookresearch/dinov2 PR #411,
facebookresearch/dinov3 issue #286). :data:`DINOV2_BLUR_PROBS` are those, the probabilities that
made DINOv2's weights; ``(1.0, 0.1, 0.5)`` are the ones its config names.

The library is kornia's ``augmentation`` module: it is made for batches on any device and draws
every parameter per image (factors, whether to apply, blur sigma), where torchvision's v2
transforms given a batch draw one set for the whole batch and would need a Python loop over
images. Its ops match torchvision's functional ones given the same parameters (held to 1e-4 by
``tests/test_dinov2_views.py``); one difference is left: kornia draws the order of the four
jitter operations once per call (per crop group here), torchvision once per image.

The data modules normalise their images; the views un-normalise with the data's mean and std,
work in [0, 1] as DINOv2's do on the decoded image, and normalise again. Under DDP every
parameter is drawn for the global batch from the step's seed and each rank keeps its own images'
rows, so an image gets the same view on any number of devices (as its crops, ``random_crops``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import kornia.augmentation as K
import torch
from torch import Tensor, nn

# (first global crop, second global crop, local crops): what DINOv2's code applies (module docstring).
DINOV2_BLUR_PROBS = (0.0, 0.9, 0.5)
# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma), which DINOv2's RandomGrayscale uses.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# Keys of kornia's parameters that are not per image.
_SHARED_PARAMS = ("order", "forward_input_shape")


def global_rows(groups: int, batch: int, rank: int, world_size: int) -> Tensor:
    """Indices, in a global batch of ``groups`` crop groups of ``batch * world_size`` images, of this rank's rows."""
    per_group = batch * world_size
    return torch.tensor([g * per_group + i for g in range(groups) for i in range(rank, per_group, world_size)])


class PhotometricViews(nn.Module):
    """Colour jitter, grayscale, blur and solarisation of the global and local crops, DINOv2's pipeline."""

    def __init__(
        self,
        blur_probs: Sequence[float] = DINOV2_BLUR_PROBS,
        solarize_prob: float = 0.2,
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
    ) -> None:
        super().__init__()
        self.colour = nn.ModuleList(
            [
                K.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=jitter_prob),
                K.RandomGrayscale(rgb_weights=torch.tensor(GRAY_WEIGHTS), p=grayscale_prob),
            ]
        )
        self.blurs = nn.ModuleList(
            [K.RandomGaussianBlur(9, (0.1, 2.0), border_type="reflect", p=p) for p in blur_probs]
        )
        self.solarize = K.RandomSolarize(thresholds=(128 / 255, 128 / 255), additions=0.0, p=solarize_prob)
        for module in self.modules():  # kornia's parameter ranges are configuration, not checkpoint state
            for name, buffer in list(module.named_buffers(recurse=False)):
                module.register_buffer(name, buffer, persistent=False)

    def forward(
        self,
        global_crops: list[Tensor],
        local_crops: list[Tensor],
        mean: Tensor,
        std: Tensor,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The two global crops and the local crops, each (B, 3, H, W) normalised with ``mean``/``std`` (3, 1, 1)."""
        draws = _Draws(seed, rank, world_size)
        globals_ = self._view([global_crops[0]], [global_crops[1]], draws, mean, std)
        locals_ = self._view(local_crops, [], draws, mean, std, local=True) if local_crops else []
        return globals_, locals_

    def _view(
        self,
        first: list[Tensor],
        second: list[Tensor],
        draws: _Draws,
        mean: Tensor,
        std: Tensor,
        local: bool = False,
    ) -> list[Tensor]:
        """Views of the crop groups ``first + second``: the colour ops on all at once, blur per kind of crop."""
        crops = first + second
        batch = crops[0].shape[0]
        x = (torch.cat(crops) * std + mean).clamp_(0.0, 1.0)
        for op in self.colour:
            x = draws.apply(cast(K.AugmentationBase2D, op), x, len(crops))
        parts = list(x.split(batch))
        if local:
            parts = list(draws.apply(cast(K.AugmentationBase2D, self.blurs[2]), x, len(crops)).split(batch))
        else:
            for index, blur in enumerate(cast("list[K.AugmentationBase2D]", self.blurs[:2])):
                if blur.p > 0:
                    parts[index] = draws.apply(blur, parts[index], 1)
            if self.solarize.p > 0:
                parts[1] = draws.apply(self.solarize, parts[1], 1)
        return [(part - mean) / std for part in parts]


class _Draws:
    """kornia parameters drawn for the global batch from one seed, each rank applying its own rows."""

    def __init__(self, seed: int, rank: int, world_size: int) -> None:
        self.seed, self.rank, self.world_size, self.calls = seed, rank, world_size, 0

    def apply(self, op: K.AugmentationBase2D, x: Tensor, groups: int) -> Tensor:
        batch = x.shape[0] // groups
        shape = torch.Size([batch * self.world_size * groups, *x.shape[1:]])
        with torch.random.fork_rng(devices=[]):  # kornia draws from the CPU's default generator
            torch.default_generator.manual_seed(self.seed * 1_000_003 + self.calls)  # CPU only: cheap
            params = op.forward_parameters(shape)
        self.calls += 1
        if self.world_size > 1:
            rows = global_rows(groups, batch, self.rank, self.world_size)
            params = {k: v if k in _SHARED_PARAMS else v[rows] for k, v in params.items()}
        params = {k: v if k == "forward_input_shape" else v.to(x.device) for k, v in params.items()}
        params["forward_input_shape"] = torch.tensor(x.shape)
        return op(x, params=params)
