"""LOST object discovery (Siméoni et al., BMVC 2021) on patch keys, and its CorLoc score.

For each image, with ``A = K K^T`` the similarity of the last block's patch keys (registers
and CLS excluded; LOST needs no class token, so ViTs without one are probed the same way):

1. a patch's degree is how many patches it correlates positively with (``A > 0``); the seed
   is the patch of lowest degree (objects are smaller than the background, so a patch inside
   one correlates with few others);
2. of the ``k`` lowest-degree patches, those correlating positively with the seed are the
   seed's "similars"; a patch is foreground when its summed correlation with them is positive;
3. the box is the bounding box of the foreground component (4-connected) holding the seed.

Everything is batched over images; the connected component is grown by repeated 4-neighbour
dilation inside the foreground, which on patch grids of a few hundred cells is cheaper than
labelling all components.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import masks_to_boxes

_CROSS = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def key_similarity(keys: Tensor) -> Tensor:
    """Keys (B, P, Dk) -> patch similarity ``A = K K^T`` (B, P, P)."""
    flat = keys.float()
    return flat @ flat.transpose(1, 2)


def lost_seeds(similarity: Tensor) -> tuple[Tensor, Tensor]:
    """Patches sorted by degree (lowest first, ties by index) (B, P), and each image's seed (B,)."""
    degree = (similarity > 0).sum(dim=-1)
    order = degree.argsort(dim=-1, stable=True)
    return order, order[:, 0]


def lost_foreground(similarity: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Foreground patches (B, P) from seed expansion among the ``k`` lowest-degree patches, and the seeds."""
    order, seed = lost_seeds(similarity)
    batch = torch.arange(similarity.shape[0], device=similarity.device)
    candidates = order[:, :k]
    similar = similarity[batch[:, None], seed[:, None], candidates] > 0  # (B, k)
    rows = similarity[batch[:, None], candidates]  # (B, k, P): each candidate's correlations
    score = (rows * similar[..., None]).sum(dim=1)
    foreground = score > 0
    foreground[batch, seed] = True  # the component must hold its seed
    return foreground, seed


def seed_component(foreground: Tensor, seed: Tensor) -> Tensor:
    """The 4-connected component of ``foreground`` (B, h, w) that holds each image's ``seed`` (flat index)."""
    batch = foreground.shape[0]
    component = torch.zeros_like(foreground)
    component.view(batch, -1)[torch.arange(batch, device=seed.device), seed] = True
    cross = _CROSS.to(foreground.device)
    while True:
        grown = (F.conv2d(component[:, None].float(), cross, padding=1)[:, 0] > 0) & foreground
        if torch.equal(grown, component):
            return component
        component = grown


def mask_boxes(masks: Tensor) -> Tensor:
    """Tight xyxy boxes (B, 4) of non-empty boolean masks (B, h, w), in cells, x2/y2 exclusive."""
    boxes = masks_to_boxes(masks)  # inclusive corners
    boxes[:, 2:] += 1
    return boxes


def lost_boxes(keys: Tensor, patch_size: tuple[int, int], k: int = 100) -> Tensor:
    """LOST's box for each image, xyxy in pixels, from patch keys on their grid (B, h, w, Dk)."""
    batch, height, width, _ = keys.shape
    foreground, seed = lost_foreground(key_similarity(keys.reshape(batch, height * width, -1)), k)
    component = seed_component(foreground.view(batch, height, width), seed)
    scale = torch.tensor([patch_size[1], patch_size[0], patch_size[1], patch_size[0]], device=keys.device).float()
    return mask_boxes(component) * scale


def paired_box_iou(boxes: Tensor, targets: Tensor) -> Tensor:
    """IoU of each box with its own target (both (N, 4) xyxy)."""
    top_left = torch.maximum(boxes[:, :2], targets[:, :2])
    bottom_right = torch.minimum(boxes[:, 2:], targets[:, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1)
    target_area = (targets[:, 2:] - targets[:, :2]).clamp(min=0).prod(dim=1)
    union = area + target_area - intersection
    return torch.where(union > 0, intersection / union.clamp(min=1e-12), torch.zeros_like(union))


def corloc(boxes: Tensor, targets: Tensor, threshold: float = 0.5) -> float:
    """Correct localisation: the share of images whose box has IoU >= ``threshold`` with the target."""
    return (paired_box_iou(boxes, targets) >= threshold).float().mean().item()
