"""DINOv2's losses: Sinkhorn-Knopp teacher targets, the KoLeo regulariser and the iBOT masked-patch loss.

Each function computes what facebookresearch/dinov2 computes (``dinov2/loss/``), on one process to
float precision (``tests/test_dinov2_losses.py`` holds them to DINOv2's formulas):

- :func:`sinkhorn_knopp` is ``DINOLoss.sinkhorn_knopp_teacher`` and ``iBOTPatchLoss.sinkhorn_knopp_teacher``:
  under ``torch.distributed`` its sums and its sample count are all-reduced, as DINOv2's are, so
  the targets of N processes are those of one process holding the global batch;
- :func:`koleo_loss` is ``KoLeoLoss()(features)``;
- :func:`ibot_patch_loss` is ``iBOTPatchLoss.forward`` on dense (B, N, K) tensors; the task calls
  :func:`masked_patch_loss`, the same loss on the masked patches alone (``iBOTPatchLoss.forward_masked``),
  with the weights :func:`patch_weights` gives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def _all_reduce(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over the processes of ``torch.distributed`` (in place), when it is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temp: float, n_iterations: int = 3) -> Tensor:
    """Teacher targets (B, K) from ``logits`` (B, K): ``exp(logits / temp)`` balanced by Sinkhorn-Knopp.

    Every prototype gets the same total mass over the (global) batch and every sample's row sums
    to 1. Computed in float32, as DINOv2 does.
    """
    q = torch.exp(logits.float() / temp).t()  # K x B, as in DINOv2 (and SwAV)
    num_prototypes = q.shape[0]
    num_samples = _all_reduce(torch.tensor(float(q.shape[1]), device=q.device))
    q /= _all_reduce(q.sum())
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))  # each prototype's total: 1/K
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)  # each sample's total: 1/B
        q /= num_samples
    q *= num_samples
    return q.t()


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko entropy estimate of ``features`` (B, D): ``-mean(log(distance to nearest neighbour))``.

    Features are L2-normalised first; the nearest neighbour is the one of highest inner product.
    Computed in float32 (DINOv2 turns autocast off for it).
    """
    with torch.autocast(features.device.type, enabled=False):
        x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
        dots = x @ x.t()
        dots.fill_diagonal_(-1.0)
        nearest = dots.argmax(dim=1)
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
        return -torch.log(distances + eps).mean()


def patch_weights(masks: Tensor) -> Tensor:
    """Each masked patch's weight in the iBOT loss, in the order of ``masks[masks]``: 1 / (its crop's masked count * B).

    ``masks`` (B, N) bool; a crop without masked patches adds nothing but still counts in B.
    """
    counts = masks.sum(dim=-1, keepdim=True).clamp(min=1).to(torch.float32)
    return (1.0 / (counts * masks.shape[0])).expand_as(masks)[masks]


def masked_patch_loss(student_logits: Tensor, teacher_probs: Tensor, weights: Tensor, student_temp: float) -> Tensor:
    """iBOT's loss on the masked patches alone: ``student_logits``, ``teacher_probs`` (M, K), ``weights`` (M,)."""
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    cross_entropy = -(teacher_probs * log_probs).sum(dim=-1)
    return (cross_entropy * weights).sum()


def ibot_patch_loss(student_logits: Tensor, teacher_probs: Tensor, masks: Tensor, student_temp: float) -> Tensor:
    """Cross-entropy of the teacher's patch targets under the student's, on masked patches, per crop then averaged.

    ``student_logits`` and ``teacher_probs`` (B, N, K), ``masks`` (B, N) (True: masked for the student).
    """
    masks = masks.bool()
    return masked_patch_loss(student_logits[masks], teacher_probs[masks], patch_weights(masks), student_temp)
