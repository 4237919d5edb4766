"""regablate.tasks.losses against DINOv2's own formulas, re-written here from facebookresearch/dinov2.

Each ``dinov2_*`` function below is the computation of DINOv2's ``dinov2/loss/*.py`` on one
process (its ``torch.distributed`` calls left out), kept as close to the original as the test allows.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regablate.tasks.losses import ibot_patch_loss, koleo_loss, masked_patch_loss, patch_weights, sinkhorn_knopp
from regablate.tasks.masking import block_mask, draw_masks

TOLERANCE = 1e-5


def dinov2_sinkhorn_knopp_teacher(teacher_output, teacher_temp, n_iterations=3):
    """``DINOLoss.sinkhorn_knopp_teacher`` (dinov2/loss/dino_clstoken_loss.py), world size 1."""
    teacher_output = teacher_output.float()
    world_size = 1
    Q = torch.exp(teacher_output / teacher_temp).t()
    B = Q.shape[1] * world_size
    K = Q.shape[0]
    sum_Q = torch.sum(Q)
    Q /= sum_Q
    for _ in range(n_iterations):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        Q /= sum_of_rows
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


class DINOv2KoLeoLoss(nn.Module):
    """``KoLeoLoss`` (dinov2/loss/koleo_loss.py)."""

    def __init__(self):
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    def pairwise_NNs_inner(self, x):
        dots = torch.mm(x, x.t())
        n = x.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)
        _, I = torch.max(dots, dim=1)  # noqa: E741
        return I

    def forward(self, student_output, eps=1e-8):
        student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
        I = self.pairwise_NNs_inner(student_output)  # noqa: E741
        distances = self.pdist(student_output, student_output[I])
        return -torch.log(distances + eps).mean()


def dinov2_ibot_forward(student_patch_tokens, teacher_patch_tokens, student_masks_flat, student_temp):
    """``iBOTPatchLoss.forward`` (dinov2/loss/ibot_patch_loss.py)."""
    t, s = teacher_patch_tokens, student_patch_tokens
    loss = torch.sum(t * F.log_softmax(s / student_temp, dim=-1), dim=-1)
    loss = torch.sum(loss * student_masks_flat.float(), dim=-1) / student_masks_flat.sum(dim=-1).clamp(min=1.0)
    return -loss.mean()


def dinov2_ibot_forward_masked(s, t, student_masks_flat, student_temp, n_masked_patches, masks_weight):
    """``iBOTPatchLoss.forward_masked`` without xFormers, times the 2 * 1/2 scales of ``SSLMetaArch``."""
    loss = torch.sum(t * F.log_softmax(s / student_temp, dim=-1), dim=-1)
    loss = loss[:n_masked_patches] * masks_weight
    return -loss.sum() / student_masks_flat.shape[0]


def dinov2_dino_loss(student_global, student_local, teacher_probs, n_local, student_temp):
    """``SSLMetaArch.forward_backward``'s DINO terms: local crops against both teacher crops, global
    crops against the other one (the teacher's chunks swapped), over (2 - 1) * 2 + 2 * n_local terms."""

    def dino(student_list, teacher_list):
        total = 0
        for s in student_list:
            lsm = F.log_softmax(s / student_temp, dim=-1)
            for t in teacher_list:
                total -= torch.sum(t * lsm, dim=-1).mean()
        return total

    terms = 2 + 2 * n_local
    chunks = teacher_probs.chunk(2)
    swapped = torch.cat([chunks[1], chunks[0]])
    local = dino(student_local.chunk(n_local), chunks) / terms
    global_ = dino([student_global], [swapped]) * 2 / terms
    return local + global_


class DINOv2MaskingGenerator:
    """``MaskingGenerator`` (dinov2/data/masking.py) as train.py builds it, drawing from ``rng``."""

    def __init__(self, input_size, rng, max_num_patches):
        self.height, self.width = input_size
        self.rng = rng
        self.min_num_patches = 4
        self.max_num_patches = max_num_patches
        self.log_aspect_ratio = (np.log(0.3), np.log(1 / 0.3))

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = self.rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = np.exp(self.rng.uniform(*self.log_aspect_ratio))
            h = int(round(np.sqrt(target_area * aspect_ratio)))
            w = int(round(np.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = self.rng.randint(0, self.height - h)
                left = self.rng.randint(0, self.width - w)
                num_masked = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches=0):
        mask = np.zeros(shape=(self.height, self.width), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            mask_count += delta
        return mask


def test_sinkhorn_knopp_is_dinov2s():
    torch.manual_seed(0)
    for batch, prototypes, temp, iterations in [(16, 64, 0.07, 3), (7, 300, 0.04, 5), (32, 16, 0.1, 1)]:
        logits = torch.randn(batch, prototypes).tanh()  # a DINO head's logits: cosines with unit prototypes
        ours = sinkhorn_knopp(logits, temp, iterations)
        theirs = dinov2_sinkhorn_knopp_teacher(logits.clone(), temp, iterations)
        assert (ours - theirs).abs().max() < TOLERANCE
        assert torch.allclose(ours.sum(-1), torch.ones(batch), atol=1e-5)  # each sample: a distribution


def test_koleo_loss_is_dinov2s():
    torch.manual_seed(1)
    for batch, dim in [(16, 32), (5, 384), (64, 8)]:
        features = torch.randn(batch, dim)
        assert abs(koleo_loss(features) - DINOv2KoLeoLoss()(features.clone())) < TOLERANCE
    # It falls as the features spread: identical features are the worst case.
    close = torch.randn(1, 16) + 1e-3 * torch.randn(8, 16)
    assert koleo_loss(close) > koleo_loss(torch.randn(8, 16))


def test_ibot_patch_loss_is_dinov2s_forward_and_forward_masked():
    torch.manual_seed(2)
    batch, patches, prototypes, temp = 6, 16, 32, 0.1
    student = torch.randn(batch, patches, prototypes)
    teacher = torch.randn(batch, patches, prototypes).softmax(-1)
    masks = torch.rand(batch, patches) < 0.3
    masks[0] = False  # a crop without masked patches counts in the mean
    masks[1, :3] = True
    ours = ibot_patch_loss(student, teacher, masks, temp)
    assert abs(ours - dinov2_ibot_forward(student, teacher, masks, temp)) < TOLERANCE
    # The masked form, with the weights DINOv2's collate computes.
    weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    theirs = dinov2_ibot_forward_masked(student[masks], teacher[masks], masks, temp, int(masks.sum()), weights)
    ours_masked = masked_patch_loss(student[masks], teacher[masks], patch_weights(masks), temp)
    assert abs(ours_masked - theirs) < TOLERANCE and abs(ours_masked - ours) < TOLERANCE


def test_dino_loss_is_dinov2s_local_and_global_terms():
    from tests.test_dino import task

    torch.manual_seed(3)
    batch, n_local, prototypes = 4, 3, 64
    dino = task(out_dim=prototypes)
    student_global, student_local = torch.randn(2 * batch, prototypes), torch.randn(n_local * batch, prototypes)
    teacher = torch.randn(2 * batch, prototypes).softmax(-1)
    ours = dino.dino_loss(torch.cat([student_global, student_local]), teacher)
    theirs = dinov2_dino_loss(student_global, student_local, teacher, n_local, dino.hparams.student_temp)
    assert abs(ours - theirs) < TOLERANCE


@pytest.mark.parametrize("grid,count", [((8, 8), 20), ((16, 16), 100), ((4, 4), 7), ((14, 10), 60)])
def test_block_masks_are_dinov2s_masking_generator(grid, count):
    for seed in range(5):
        ours = block_mask(*grid, count, random.Random(seed))
        max_patches = 0.5 * grid[0] * grid[1]
        theirs = DINOv2MaskingGenerator(grid, random.Random(seed), max_patches)(count)
        assert np.array_equal(ours, theirs)
        assert 0 < ours.sum() <= count


def test_masks_follow_dinov2s_collate_and_are_the_same_on_any_number_of_ranks():
    grid, batch = (8, 8), 8
    whole = draw_masks(batch, grid, (0.1, 0.5), 0.5, seed=7)
    counts = whole.masks.sum(-1)
    assert whole.masks.shape == (2 * batch, 64)
    assert int((counts > 0).sum()) == int(2 * batch * 0.5)  # half of the global crops are masked
    assert counts.max() <= 0.5 * 64  # ratios within mask_ratio_min_max
    torch.testing.assert_close(whole.weights, patch_weights(whole.masks))
    assert torch.equal(whole.indices, whole.masks.flatten().nonzero().flatten())
    for rank in (0, 1):
        part = draw_masks(batch // 2, grid, (0.1, 0.5), 0.5, seed=7, rank=rank, world_size=2)
        rows = [crop * batch + i for crop in range(2) for i in range(rank, batch, 2)]  # crop 1, then crop 2
        assert torch.equal(part.masks, whole.masks[rows])
    none = draw_masks(batch, grid, (0.1, 0.5), 0.0, seed=7)
    assert not none.masks.any() and none.indices.numel() == 0
