"""DINOv2's protocols (``--probe.protocol dinov2``) against the reference formulas, and end to end.

Each reference is written here from facebookresearch/dinov2 (and the mmseg / depth-toolbox code
its evaluations run on), independently of the implementation under test.
"""

from __future__ import annotations

import io
import json
import math

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from regablate.cli import main
from regablate.data import HFDataModule, SyntheticScenes
from regablate.data.nyud import depth_png
from regablate.errors import RegablateError
from regablate.models import build_backbone, extract_features
from regablate.probe import LinearProbe, ProbeDevice, ViTExtractor, run_probe
from regablate.probe.device import available_cpus
from regablate.probe.dinov2 import DINOv2Settings
from regablate.probe.dinov2 import runner as dinov2_runner
from regablate.probe.dinov2.backbone import FrozenBackbone, center_padding
from regablate.probe.dinov2.classification import ClassifierGrid, head_grid
from regablate.probe.dinov2.data import IGNORE, raw_dataset
from regablate.probe.dinov2.depth import (
    LinearDepthHead,
    grouped_sigloss,
    image_rmse,
    linear_normalise,
    sigloss,
    uniform_bins,
)
from regablate.probe.dinov2.runner import run_dinov2
from regablate.probe.dinov2.schedules import warmup_cosine, warmup_poly
from regablate.probe.dinov2.segmentation import SegmentationProbe, slide_windows
from regablate.probe.dinov2.settings import DINOV2_LRS, NYU_TRAIN_CROP, frame_region
from regablate.probe.dinov2.views import SegmentationLabels, SegmentationTrainView, rescale_size
from regablate.probe.run import check_protocol_devices
from tests.conftest import TINY

TINY_MODEL = dict(TINY)


def tiny_backbone(registers: int = 2, depth: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("vit_tiny_patch16_224", registers, **{**TINY_MODEL, "depth": depth})


# --- depth: SigLoss, bins, the linear normalisation, the Eigen crop ---------------------------------


def reference_sigloss(pred: np.ndarray, gt: np.ndarray, warm_up: bool = False) -> float:
    """dinov2/eval/depth/models/losses/sigloss.py, in numpy: valid = gt > 0, eps = 0.001,
    g = log(pred + eps) - log(gt + eps); sqrt(var(g) + 0.15 mean(g)^2) (torch.var: unbiased);
    during warm-up sqrt(0.15 mean(g)^2)."""
    valid = gt > 0
    g = np.log(pred[valid] + 0.001) - np.log(gt[valid] + 0.001)
    mean = g.sum() / g.size
    if warm_up:
        return math.sqrt(0.15 * mean**2)
    var = ((g - mean) ** 2).sum() / (g.size - 1)
    return math.sqrt(var + 0.15 * mean**2)


def test_sigloss_matches_dinov2s_formula_on_given_predictions_and_targets():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 9.0, (2, 1, 12, 16)).astype(np.float32)
    gt[0, 0, :3] = 0.0  # unknown depth: left out
    pred = (gt * rng.uniform(0.7, 1.4, gt.shape)).astype(np.float32) + 0.05
    for warm_up in (False, True):
        ours = float(sigloss(torch.from_numpy(pred), torch.from_numpy(gt), mean_only=warm_up))
        assert ours == pytest.approx(reference_sigloss(pred, gt, warm_up), rel=1e-5)
    # Scale invariance up to eps: a prediction c x the truth costs sqrt(0.15) * log(c), whatever the truth.
    scaled = 2.0 * gt
    assert float(sigloss(torch.from_numpy(scaled), torch.from_numpy(gt))) == pytest.approx(
        math.sqrt(0.15) * math.log(2.0), rel=1e-3
    )
    # Per-GPU losses (2 images each in dinov2's runs) are averaged, not pooled.
    grouped = float(grouped_sigloss(torch.from_numpy(pred), torch.from_numpy(gt), group=1, mean_only=False))
    per_image = [reference_sigloss(pred[i : i + 1], gt[i : i + 1]) for i in range(2)]
    assert grouped == pytest.approx(sum(per_image) / 2, rel=1e-5)


def test_bins_and_the_linear_normalisation_follow_depth_pred():
    # decode_head.py depth_pred: bins = linspace(min_depth, max_depth, n_bins) ("UD"); "linear":
    # logit = relu(logit) + 0.1; logit / logit.sum(dim=1); depth = einsum("ikmn,k->imn", logit, bins).
    bins = uniform_bins(0.001, 10.0, 256)
    assert len(bins) == 256 and float(bins[0]) == pytest.approx(0.001) and float(bins[-1]) == pytest.approx(10.0)
    assert float(bins[1] - bins[0]) == pytest.approx((10.0 - 0.001) / 255, rel=1e-5)
    logits = torch.tensor([-3.0, 0.0, 1.9, 0.4]).view(1, 4, 1, 1)
    expected = torch.tensor([0.1, 0.1, 2.0, 0.5]) / 2.7
    assert torch.allclose(linear_normalise(logits).flatten(), expected)
    # One dominant bin: depth -> that bin; all logits equal (or negative): the mean bin.
    small = uniform_bins(1.0, 4.0, 4)
    probs = linear_normalise(torch.tensor([1e6, -1.0, -1.0, -1.0]).view(1, 4, 1, 1))
    assert float(torch.einsum("ikmn,k->imn", probs, small)) == pytest.approx(1.0, abs=1e-4)
    probs = linear_normalise(torch.full((1, 4, 1, 1), -5.0))
    assert float(torch.einsum("ikmn,k->imn", probs, small)) == pytest.approx(2.5)


def test_depth_head_equals_dinov2s_upsample_then_conv_order():
    """BNHead concatenates [patch, CLS broadcast], upsamples x4 and then convolves; ours convolves first."""
    torch.manual_seed(0)
    head = LinearDepthHead(8, uniform_bins(0.001, 10.0, 256))
    patches, cls = torch.randn(2, 8, 3, 5), torch.randn(2, 8)
    features = torch.cat([patches, cls[:, :, None, None].expand_as(patches)], dim=1)
    features = F.interpolate(features, size=[12, 20], mode="bilinear", align_corners=False)
    with torch.no_grad():
        logits = head.conv_depth(features)
    reference = torch.einsum("ikmn,k->imn", linear_normalise(logits), head.bins).unsqueeze(1)
    with torch.no_grad():
        ours = head(patches, cls)
    assert ours.shape == (2, 1, 12, 20)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert float(ours.min()) >= 0.001 and float(ours.max()) <= 10.0


def test_the_eigen_crop_of_prepared_nyud_is_what_the_depth_protocol_scores():
    # Monocular-Depth-Estimation-Toolbox depth/datasets/nyu.py (dinov2's NYUd evaluation), on 480 x 640:
    #   eval_mask = np.zeros(valid_mask.shape); eval_mask[45:471, 41:601] = 1
    #   valid_mask = (gt > min_depth_eval) & (gt < max_depth_eval) & eval_mask   (1e-3, 10)
    reference = np.zeros((480, 640), dtype=bool)
    reference[45:471, 41:601] = True
    png, invalid = depth_png(np.full((480, 640), 2000.0), eigen_crop=True)  # the data's Eigen crop: 0 outside
    stored = np.asarray(Image.open(io.BytesIO(png))).astype(np.float32) * 0.001
    assert np.array_equal(stored > 0, reference) and invalid == 480 * 640 - 426 * 560
    truth = torch.from_numpy(stored)
    truth[100, 100] = 20.0  # beyond max_depth_eval
    prediction = torch.full((480, 640), 2.0)
    prediction[0, 0] = 100.0  # outside the crop
    prediction[100, 100] = 0.0
    prediction[200, 300] = 5.0  # inside: error 3 on one pixel of the 426 x 560 - 1 scored
    expected = math.sqrt(9.0 / (426 * 560 - 1))
    assert image_rmse(prediction, truth, 0.001, 10.0) == pytest.approx(expected, rel=1e-4)
    assert math.isnan(image_rmse(prediction, torch.zeros(480, 640), 0.001, 10.0))
    # The training crop (NYUCrop in depth/datasets/pipelines/transforms.py: img[45:472, 43:608]) is the protocol's.
    assert frame_region(NYU_TRAIN_CROP, 480, 640) == (45, 472, 43, 608)
    assert frame_region(NYU_TRAIN_CROP, 48, 64) == (4, 47, 4, 61)  # the same fractions of a smaller frame


# --- classification: the 52 heads -------------------------------------------------------------------


def test_the_52_head_grid_and_its_learning_rate_scaling():
    # linear.py setup_linear_classifiers: for n in [1, 4], avgpool in [False, True], lr in 13 lrs,
    # lr = scale_lr(lr, batch) = lr * batch_size * world_size / 256.
    heads = head_grid((1, 4), DINOV2_LRS, batch_size=1024)
    assert len(DINOV2_LRS) == 13 and len(heads) == 52
    assert [(h.n_blocks, h.avgpool) for h in heads[::13]] == [(1, False), (1, True), (4, False), (4, True)]
    assert all(h.scaled_lr == pytest.approx(h.lr * 1024 / 256) for h in heads)
    assert heads[-1].name == "classifier_4_blocks_avgpool_True_lr_0_40000"
    assert heads[0].name == "classifier_1_blocks_avgpool_False_lr_0_00004"
    backbone = FrozenBackbone(tiny_backbone(depth=4))
    grid = ClassifierGrid(backbone, DINOv2Settings(cls_batch_size=512, cls_n_last_blocks=(1, 4)), num_classes=7)
    weight = grid.grid.weight.detach()
    assert weight.shape == (4, 13, 5 * 32, 7)  # widest input: 4 CLS + the mean patch
    assert float(weight.std()) == pytest.approx(0.01, rel=0.05) and float(grid.grid.bias.detach().abs().max()) == 0
    assert torch.allclose(grid.grid.lrs, torch.tensor(DINOV2_LRS) * 2)
    # create_linear_input: the CLS tokens of the last n (normed) blocks, then the last block's mean patch.
    images = torch.randn(3, 3, 32, 32)
    inputs = grid.inputs(images)
    blocks = extract_features(backbone.model, images, blocks=[-4, -3, -2, -1]).blocks  # pre-norm [CLS, REG, PATCH]
    normed = [backbone.model.norm(blocks[i]) for i in (-4, -3, -2, -1)]
    cls = [tokens[:, 0] for tokens in normed]
    mean_patch = normed[-1][:, 1 + backbone.model.num_reg_tokens :].mean(dim=1)
    assert torch.allclose(inputs[0, :, :32], cls[-1], atol=1e-6) and float(inputs[0, :, 32:].abs().max()) == 0
    assert torch.allclose(inputs[1, :, :64], torch.cat([cls[-1], mean_patch], -1), atol=1e-5)
    assert torch.allclose(inputs[3], torch.cat([*cls, mean_patch], -1), atol=1e-5)


def test_too_many_last_blocks_for_the_backbone_is_one_clear_error():
    from regablate.errors import RegablateError

    data = SyntheticScenes(train_size=8, val_size=8, test_size=8)
    with pytest.raises(RegablateError, match="cls_n_last_blocks"):
        run_dinov2(tiny_backbone(depth=2), data, DINOv2Settings(), probes=["cls"])


# --- segmentation: sliding windows, labels, crops ---------------------------------------------------


def reference_windows(h_img: int, w_img: int, crop: int = 512, stride: int = 341) -> list[tuple[int, int, int, int]]:
    """mmseg EncoderDecoder.slide_inference (and dinov2/hub/depth/encoder_decoder.py)."""
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    out = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


def test_slide_inference_windows_on_a_683x512_image():
    landscape = slide_windows(512, 683, 512, 341)  # 683 wide, 512 high
    assert landscape == reference_windows(512, 683) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    portrait = slide_windows(683, 512, 512, 341)
    assert portrait == reference_windows(683, 512) == [(0, 512, 0, 512), (171, 683, 0, 512)]
    assert slide_windows(300, 200, 512, 341) == [(0, 300, 0, 200)]  # smaller than a window: the whole image
    assert slide_windows(1100, 1500, 512, 341) == reference_windows(1100, 1500)


def test_slide_averages_overlapping_windows():
    probe = SegmentationProbe(FrozenBackbone(tiny_backbone()), DINOv2Settings(), SegmentationLabels(3, None), 1.0)
    probe.crop, probe.stride = 512, 341
    # Logits that are each window's mean value everywhere on a coarse grid.
    probe.logits = lambda crops: crops.mean(dim=(1, 2, 3), keepdim=True)[:, :1].expand(-1, 1, 4, 4)
    image = torch.zeros(1, 3, 512, 683)
    image[..., 512:] = 6.0  # window 1 (x 0..512) mean 0; window 2 (x 171..683) mean 6 * 171 / 512
    out = probe.slide(image)[0, 0]
    second = 6.0 * 171 / 512
    assert float(out[:, :171].abs().max()) == 0.0
    assert torch.allclose(out[:, 171:512], torch.full((512, 341), second / 2))
    assert torch.allclose(out[:, 512:], torch.full((512, 171), second))


def test_segmentation_labels_reduce_zero_label_when_the_ignored_value_is_a_class():
    ade = SegmentationLabels(151, 0)  # ADE20k: 0 "other" ignored, 1..150 -> 0..149 (reduce_zero_label)
    assert ade.num_classes == 150 and ade.reduces
    assert ade(np.array([0, 1, 150, 7])).tolist() == [IGNORE, 0, 149, 6]
    voc = SegmentationLabels(21, 255)  # VOC: 255 is no class, ids unchanged
    assert voc.num_classes == 21 and not voc.reduces
    assert voc(np.array([0, 20, 255])).tolist() == [0, 20, IGNORE]


def test_mmcv_rescale_and_the_training_crop():
    # mmcv imrescale: factor = min(max_long / long, max_short / short), size = int(x * factor + 0.5).
    assert rescale_size(683, 512, 2048, 512) == (683, 512)
    assert rescale_size(400, 1000, 2048, 512) == (512, 1280)
    assert rescale_size(100, 1000, 2048, 512) == (205, 2048)  # the long side caps it
    view = SegmentationTrainView(SegmentationLabels(4, 255), 20, (1.0, 1.0), 32, 0.75, (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(0)
    sample = {"image": torch.rand(3, 20, 30), "mask": torch.randint(0, 4, (20, 30))}
    out = view(sample)
    assert out["image"].shape == (3, 32, 32) and out["mask"].shape == (32, 32)
    assert bool((out["mask"][20:] == IGNORE).all()) and bool((out["mask"][:, 30:] == IGNORE).all())
    assert float(out["image"][:, 20:].abs().max()) == 0.0  # padded after normalisation, with 0


# --- the backbone: DINOv2's get_intermediate_layers ----------------------------------------------------


def test_frozen_backbone_gives_the_tokens_of_the_model_at_any_size():
    model = tiny_backbone(registers=3)
    images = torch.randn(2, 3, 32, 32)
    expected = extract_features(model, images, blocks=[-1])
    backbone = FrozenBackbone(model)
    ((patches, cls),) = backbone.last_blocks(images, 1, norm=True)
    assert torch.allclose(cls, expected.cls, atol=1e-6)  # the final norm's CLS, registers dropped
    assert torch.allclose(patches.flatten(2).transpose(1, 2), expected.patches, atol=1e-6)
    ((raw_patches, raw_cls),) = backbone.last_blocks(images, 1, norm=False)
    assert torch.allclose(raw_cls, expected.blocks[-1][:, 0], atol=1e-6)
    # dinov2/hub/utils.py CenterPadding: pad to ceil(size / p) * p, left = pad // 2, right = the rest.
    assert center_padding(30, 4) == (1, 1) and center_padding(37, 4) == (1, 2) and center_padding(32, 4) == (0, 0)
    ((odd, _),) = backbone.last_blocks(torch.randn(1, 3, 30, 37), 1, norm=True)
    assert odd.shape == (1, 32, 8, 10)
    assert model.dynamic_img_size is False and model.patch_embed.strict_img_size  # restored afterwards


def test_schedules_follow_mmcvs_lr_hooks():
    def warm(t, warmup, ratio):  # LrUpdaterHook.get_warmup_lr, "linear"
        k = (1 - t / warmup) * (1 - ratio)
        return 1 - k

    poly = warmup_poly(40000, 1500)
    for t in (0, 700, 1499):
        assert poly(t) == pytest.approx((1 - t / 40000) * warm(t, 1500, 1e-6))
    assert poly(20000) == pytest.approx(0.5) and poly(40000) == 0.0
    cosine = warmup_cosine(38400, 12800)
    for t in (0, 6400, 12800, 30000):
        regular = 1e-8 + (1 - 1e-8) / 2 * (math.cos(math.pi * t / 38400) + 1)  # annealing_cos(1, 1e-8, t / T)
        assert cosine(t) == pytest.approx(regular * (warm(t, 12800, 1e-3) if t < 12800 else 1.0))


# --- data: raw samples from SyntheticScenes and a local HF dataset --------------------------------------


def test_raw_samples_of_synthetic_scenes_are_the_unnormalised_scenes():
    data = SyntheticScenes(img_size=24, train_size=4, val_size=4, test_size=4, hflip=True)
    raw, normalised = raw_dataset(data, "val")[1], data.dataset("val")[1]
    mean, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
    assert torch.allclose(raw["image"], normalised["image"] * std + mean, atol=1e-6)
    assert float(raw["image"].min()) >= 0 and float(raw["image"].max()) <= 1
    assert torch.equal(raw["mask"], normalised["mask"]) and torch.equal(raw["depth"], normalised["depth"])


@pytest.fixture
def local_dense_dataset(tmp_path, offline_hf):
    """A tiny ADE20k/NYUd-like dataset saved to disk: 40 x 56 images, masks with 0 = ignored, depth in mm."""
    rng = np.random.default_rng(0)

    def rows(n):
        masks = [rng.integers(0, 4, (40, 56), dtype=np.uint8) for _ in range(n)]
        return {
            "image": [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(n)],
            "annotation": [Image.fromarray(m) for m in masks],
            "depth_mm": [(1000.0 + 500.0 * m.astype(np.float32)).tolist() for m in masks],
        }

    datasets.DatasetDict(
        train=datasets.Dataset.from_dict(rows(12)),
        validation=datasets.Dataset.from_dict(rows(4)),
        test=datasets.Dataset.from_dict(rows(4)),
    ).save_to_disk(str(tmp_path / "dense"))
    return HFDataModule(
        str(tmp_path / "dense"),
        label_column=None,
        mask_column="annotation",
        depth_column="depth_mm",
        depth_scale=0.001,
        num_seg_classes=4,
        img_size=32,
        batch_size=4,
    )


def test_raw_samples_of_a_local_hf_dataset_keep_their_resolution_and_units(local_dense_dataset):
    sample = raw_dataset(local_dense_dataset, "train")[0]
    assert sample["image"].shape == (3, 40, 56) and sample["image"].dtype == torch.float32
    assert float(sample["image"].min()) >= 0 and float(sample["image"].max()) <= 1
    assert sample["mask"].shape == (40, 56) and set(sample["mask"].unique().tolist()) <= {0, 1, 2, 3}
    assert torch.allclose(sample["depth"], 1.0 + 0.5 * sample["mask"].float())  # mm x depth_scale


def test_dense_protocols_run_on_a_local_hf_dataset(local_dense_dataset):
    settings = DINOv2Settings(
        image_scale=0.1,  # crops of 51, windows of 51 / 34, depth crops of 42 x 54
        eval_batch_size=2,
        seg_iterations=3,
        seg_batch_size=4,
        depth_iterations=3,
        depth_batch_size=4,
    )
    report = run_dinov2(tiny_backbone(), local_dense_dataset, settings, probes=["seg", "depth"], ignore_index=0)
    assert 0.0 <= report.metrics["probe/seg_miou"] <= 1.0
    assert report.protocol["seg"]["classes"] == 3 and report.protocol["seg"]["reduce_zero_label"]
    assert math.isfinite(report.metrics["probe/depth_rmse"]) and report.metrics["probe/depth_rmse"] > 0
    assert "mean over 4 images" in report.protocol["depth"]["score"]


def test_the_backbone_runs_on_the_probe_devices_autocast():
    model = tiny_backbone()
    images = torch.randn(2, 3, 32, 32)
    ((full, _),) = FrozenBackbone(model).last_blocks(images, 1, norm=True)
    where = ProbeDevice(accelerator="cpu", devices=1, precision="bf16-mixed")
    ((mixed, _),) = FrozenBackbone(model, where.device, where.autocast).last_blocks(images, 1, norm=True)
    assert mixed.dtype == torch.float32  # the heads compute in float32
    assert not torch.equal(mixed, full) and torch.allclose(mixed, full, atol=0.1)  # computed in bf16


@pytest.mark.skipif(available_cpus() < 2, reason="ProbeDevice(devices=2) on the CPU needs 2 cores")
def test_the_dinov2_protocol_refuses_several_devices_before_any_work():
    where = ProbeDevice(accelerator="cpu", devices=2, precision="32-true")
    with pytest.raises(RegablateError, match="runs on one device, not 2; use --devices 1"):
        check_protocol_devices(LinearProbe(protocol="dinov2"), where)
    check_protocol_devices(LinearProbe(), where)  # the fast protocol splits its extraction over them


def test_without_a_test_split_dinov2_scores_on_val_under_the_val_keys(monkeypatch):
    data = SyntheticScenes(img_size=32, train_size=32, val_size=16, test_size=16, batch_size=16)
    read = []
    real = dinov2_runner.raw_dataset
    monkeypatch.setattr(dinov2_runner, "raw_dataset", lambda dm, split: read.append(split) or real(dm, split))
    settings = DINOv2Settings(
        eval_batch_size=16,
        cls_iterations=2,
        cls_batch_size=8,
        cls_n_last_blocks=[1, 2],
        seg_iterations=2,
        seg_batch_size=4,
        depth_iterations=2,
        depth_batch_size=4,
    )
    report = run_dinov2(tiny_backbone(), data, settings, probes=["cls", "seg", "depth"], scored_on="val")
    assert read == ["train", "val"]  # no test split is read
    assert 0.0 <= report.metrics["probe/cls_val_top1"] <= 1.0 and "probe/cls_top1" not in report.metrics
    assert 0.0 <= report.metrics["probe/seg_val_miou"] <= 1.0 and "probe/seg_miou" not in report.metrics
    assert report.metrics["probe/depth_val_rmse"] > 0 and "probe/depth_rmse" not in report.metrics
    assert report.protocol["scored_on"] == "val" and "test_top1" not in report.protocol["cls"]["selected"]


# --- end to end: fast against dinov2 on a trained tiny backbone -----------------------------------------

DATA = ["--data.train_size", "512", "--data.val_size", "256", "--data.test_size", "512"]


@pytest.mark.slow  # the trained backbone: a 120-step fit (~65 s here)
def test_fast_and_dinov2_top1_agree_on_a_trained_backbone(trained_tiny_run, tmp_path):
    main(["probe", str(trained_tiny_run), *DATA, "--probe.probes", "[cls]", "--output", str(tmp_path / "fast")])
    main(
        [
            "probe",
            str(trained_tiny_run),
            *DATA,
            "--probe.protocol",
            "dinov2",
            "--probe.probes",
            "[cls]",
            "--probe.dinov2.cls_iterations",
            "150",
            "--probe.dinov2.cls_batch_size",
            "32",
            "--probe.dinov2.cls_n_last_blocks",
            "[1, 2]",
            "--output",
            str(tmp_path / "dinov2"),
        ]
    )
    fast = json.loads((tmp_path / "fast" / "summary.json").read_text())
    dinov2 = json.loads((tmp_path / "dinov2" / "summary.json").read_text())
    print({"fast": fast["probe/cls_top1"], "dinov2": dinov2["probe/cls_top1"]})
    assert fast["probe/cls_top1"] > 0.5  # a backbone that learned the classes (chance: 0.1)
    assert abs(fast["probe/cls_top1"] - dinov2["probe/cls_top1"]) < 0.05  # seen here: 0.955 and 0.957
    assert dinov2["probe/protocol"] == "dinov2" and fast["probe/protocol"] == "fast"
    assert dinov2["probe/cls_dataset"] == "SyntheticScenes"
    details = json.loads((tmp_path / "dinov2" / "probe.json").read_text())
    settings = details["protocol"]["settings"]
    assert set(DINOv2Settings.__dataclass_fields__) <= set(settings)  # every protocol parameter is recorded
    assert settings["cls_iterations"] == 150 and settings["image_scale_used"] == pytest.approx(32 / 224)
    cls = details["protocol"]["cls"]
    assert len(cls["val_top1"]) == 2 * 2 * 13
    selected = cls["selected"]
    assert cls["val_top1"][selected["name"]] == max(cls["val_top1"].values()) == dinov2["probe/cls_val_top1"]
    assert selected["scaled_lr"] == pytest.approx(selected["lr"] * 32 / 256) == dinov2["probe/cls_lr"]


@pytest.mark.slow  # the trained backbone: a 120-step fit (~65 s here)
def test_lost_runs_beside_the_dinov2_protocol_on_the_test_split_only(trained_tiny_run, tmp_path, monkeypatch):
    from regablate.probe import run as probe_run

    extracted = []
    real = probe_run.extract_split
    monkeypatch.setattr(probe_run, "extract_split", lambda *a, **k: extracted.append(1) or real(*a, **k))
    data = SyntheticScenes(img_size=32, train_size=64, val_size=32, test_size=64, batch_size=32)
    from regablate.models.resolve import load_backbone

    model = load_backbone(trained_tiny_run, "best")
    probe = LinearProbe(protocol="dinov2", probes=["lost"])
    report = run_probe(ViTExtractor(model), data, probe, output_dir=tmp_path, patch_size=(4, 4), data_config={})
    assert len(extracted) == 1  # the test split, nothing else
    assert 0.0 <= report.metrics["probe/lost_corloc"] <= 1.0 and report.metrics["probe/protocol"] == "dinov2"
