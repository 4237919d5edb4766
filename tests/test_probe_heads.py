"""Probe heads, LOST and the metrics against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from regablate.minibatch import Schedule, train_head
from regablate.probe.heads import (
    DepthHead,
    LinearClassifierGrid,
    PixelSampler,
    SegmentationHead,
    decode_depth,
    linear_bin_centres,
    miou_metric,
    rmse_metric,
)
from regablate.probe.lost import corloc, lost_boxes, lost_foreground, lost_seeds, paired_box_iou, seed_component


def test_linear_bins_and_depth_decoding():
    centres = linear_bin_centres(0.0, 4.0, 4)
    assert centres.tolist() == [0.5, 1.5, 2.5, 3.5]
    # softmax([0, ln 3]) = [1/4, 3/4] over centres [1, 3]: 1/4 + 9/4 = 2.5
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert decode_depth(logits, torch.tensor([1.0, 3.0])).item() == pytest.approx(2.5)


def test_depth_head_is_one_linear_map_of_patch_and_cls():
    torch.manual_seed(0)
    head = DepthHead(3, 3, linear_bin_centres(1.0, 5.0, 8))
    patches, cls = torch.randn(2, 2, 2, 3), torch.randn(2, 3)
    depth = head(patches, cls, (2, 2))  # same size: upsampling is the identity
    joined = torch.cat([patches, cls[:, None, None].expand(-1, 2, 2, -1)], dim=-1)
    weight = torch.cat([head.patch.weight, head.cls.weight], dim=1)
    expected = decode_depth(joined @ weight.T + head.patch.bias, head.centres)
    assert torch.allclose(depth, expected, atol=1e-6)
    assert head(patches, cls, (8, 8)).shape == (2, 8, 8)


def test_segmentation_head_upsamples_logits_to_the_mask():
    head = SegmentationHead(4, 3).eval()
    patches = torch.randn(2, 2, 2, 4)
    assert head(patches, (8, 8)).shape == (2, 3, 8, 8)
    assert torch.allclose(head(patches, (2, 2)), head.logits(patches).permute(0, 3, 1, 2))


@pytest.mark.parametrize("grid, size", [((8, 8), (32, 32)), ((3, 5), (13, 7)), ((4, 4), (4, 4))])
def test_pixel_sampler_is_bilinear_upsampling_at_the_drawn_pixels(grid, size):
    torch.manual_seed(0)
    sampler = PixelSampler(size)
    ys, xs = sampler.draw(3, 50)
    assert ys.shape == xs.shape == (3, 50) and ys.max() < size[0] and xs.max() < size[1]
    maps = torch.randn(3, *grid)
    full = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(sampler(maps, ys, xs), full[torch.arange(3)[:, None], ys, xs], atol=1e-5)
    logits = torch.randn(3, *grid, 4)  # trailing channels, as the segmentation logits come
    full = F.interpolate(logits.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
    assert torch.allclose(
        sampler(logits, ys, xs), full.permute(0, 2, 3, 1)[torch.arange(3)[:, None], ys, xs], atol=1e-5
    )


def test_miou_is_per_class_iou_over_the_dataset_ignoring_255():
    metric = miou_metric(2, ignore_index=255)
    # image 1: class 0 -> I 1, U 2; class 1 -> I 1, U 1.  image 2: class 1 -> I 1, U 2; pixel 255 ignored
    metric.update(torch.tensor([[0, 1], [0, 0]]), torch.tensor([[0, 1], [1, 255]]))
    metric.update(torch.tensor([[1, 1]]), torch.tensor([[1, 0]]))
    # class 0: I 1, U 3 (pred 0 at (0,0),(1,0); target 0 at (0,0),(0,1 of image 2)); class 1: I 2, U 4
    assert metric.compute().item() == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_rmse_metric():
    metric = rmse_metric()
    metric.update(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))
    assert metric.compute().item() == pytest.approx(math.sqrt(2.0))


def test_classifier_grid_trains_each_head_as_if_alone():
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    inputs = torch.stack([F.pad(x[:, :2], (0, 3)), x])  # group 0 sees 2 features (zero-padded), group 1 all 5
    schedule = Schedule(steps=30, batch_size=16)

    def trained(lrs):
        grid = LinearClassifierGrid(2, 5, 3, lrs)
        train_head(
            torch.optim.SGD(grid.parameters(), lr=1.0, momentum=0.9),
            lambda i: grid.loss(inputs[:, i], y[i]),
            64,
            schedule,
            "probe: cls head",
        )
        return grid

    both = trained([0.01, 0.5])
    for index, lr in enumerate([0.01, 0.5]):
        alone = trained([lr])
        assert torch.allclose(both.weight[:, index], alone.weight[:, 0], atol=1e-6)
    assert both.weight[0, :, 2:].abs().max() == 0  # padded inputs never move their weights
    assert not torch.allclose(both.weight[:, 0], both.weight[:, 1])


def _keys(grid):
    """1-D keys on a grid: +1 on object cells, -1 elsewhere."""
    return torch.tensor(grid, dtype=torch.float32)[None, ..., None] * 2 - 1


def test_head_training_reports_its_steps_through_progress(capsys):
    grid = LinearClassifierGrid(1, 4, 2, [0.1])
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    optimizer = torch.optim.SGD(grid.parameters(), lr=1.0)
    train_head(
        optimizer, lambda i: grid.loss(x[i].unsqueeze(0), y[i]), 8, Schedule(steps=5, batch_size=4), "probe: seg head"
    )
    out = capsys.readouterr().out
    assert "probe: seg head: 5 steps in " in out  # the closing line of Progress, plain off a terminal


def test_lost_seed_is_the_patch_of_lowest_degree():
    # Degrees: object cells (2 of them) correlate positively with 2 patches, background with 7.
    keys = _keys([[1, 1, 0], [0, 0, 0], [0, 0, 0]]).reshape(1, 9, 1)
    similarity = keys @ keys.transpose(1, 2)
    order, seed = lost_seeds(similarity)
    assert seed.tolist() == [0] and order[0, :2].tolist() == [0, 1]
    foreground, _ = lost_foreground(similarity, k=9)
    assert foreground.view(3, 3).int().tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 0]]


def test_lost_box_is_the_seed_component_in_pixels():
    keys = _keys([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert lost_boxes(keys, patch_size=(4, 4)).tolist() == [[0.0, 0.0, 8.0, 8.0]]


def test_seed_component_keeps_only_the_blob_holding_the_seed():
    foreground = torch.tensor([[[1, 1, 0, 1], [0, 0, 0, 1], [1, 0, 0, 1]]], dtype=torch.bool)
    component = seed_component(foreground, torch.tensor([3]))  # cell (0, 3)
    assert component.int().tolist() == [[[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1]]]


def test_box_iou_and_corloc():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0], [5.0, 5.0, 6.0, 6.0]])
    targets = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 4.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    assert paired_box_iou(boxes, targets).tolist() == pytest.approx([1 / 7, 0.5, 0.0])
    assert corloc(boxes, targets) == pytest.approx(1 / 3)  # IoU >= 0.5 counts
