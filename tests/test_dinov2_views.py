"""DINOv2's photometric views (regablate.tasks.views): its parameters, per image, normalisation undone and redone."""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF

from regablate.tasks.views import DINOV2_BLUR_PROBS, PhotometricViews, _Draws


def test_the_ops_are_dinov2s_torchvision_ops_with_parameters_drawn_per_image():
    views = PhotometricViews()
    jitter, gray = views.colour
    assert jitter.p == 0.8 and gray.p == 0.2 and views.solarize.p == 0.2
    assert [blur.p for blur in views.blurs] == list(DINOV2_BLUR_PROBS) == [0.0, 0.9, 0.5]
    torch.manual_seed(0)
    x = torch.rand(12, 3, 16, 16)
    params = jitter.forward_parameters(x.shape)
    out = jitter(x, params=params)
    factors = {name: params[f"{name}_factor"] for name in ("brightness", "contrast", "saturation", "hue")}
    # DINOv2's ColorJitter(0.4, 0.4, 0.2, 0.1): factors in [0.6, 1.4], [0.6, 1.4], [0.8, 1.2], hue in [-0.1, 0.1].
    for name, (low, high) in {"brightness": (0.6, 1.4), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)}.items():
        assert low <= factors[name].min() and factors[name].max() <= high
    assert len(set(factors["brightness"].tolist())) == 12  # one draw per image
    ops = {
        0: lambda im, b: TF.adjust_brightness(im, float(factors["brightness"][b])),
        1: lambda im, b: TF.adjust_contrast(im, float(factors["contrast"][b])),
        2: lambda im, b: TF.adjust_saturation(im, float(factors["saturation"][b])),
        3: lambda im, b: TF.adjust_hue(im, float(factors["hue"][b])),
    }
    for b in range(12):
        expected = x[b]
        if params["batch_prob"][b] > 0.5:
            for op in params["order"].tolist():
                expected = ops[op](expected, b)
        torch.testing.assert_close(out[b], expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(gray(x, params={"batch_prob": torch.ones(12)}), TF.rgb_to_grayscale(x, 3))
    blur = views.blurs[1]
    params = blur.forward_parameters(x.shape)
    params["batch_prob"] = torch.ones(12)
    sigma = params["sigma"]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0
    blurred = blur(x, params=params)
    for b in range(12):
        torch.testing.assert_close(blurred[b], TF.gaussian_blur(x[b], [9, 9], [float(sigma[b])] * 2))
    solarized = views.solarize(x, params={**views.solarize.forward_parameters(x.shape), "batch_prob": torch.ones(12)})
    torch.testing.assert_close(solarized, TF.solarize(x, 128 / 255))


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / std


def test_views_work_on_the_images_before_their_normalisation():
    mean, std = torch.tensor([0.3, 0.5, 0.7]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    torch.manual_seed(1)
    images = [torch.rand(4, 3, 16, 16) for _ in range(4)]
    crops = [normalise(x, mean, std) for x in images]
    # With every op off the views give the crops back: normalisation undone and redone exactly.
    off = PhotometricViews(blur_probs=(0.0, 0.0, 0.0), solarize_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0)
    globals_, locals_ = off(crops[:2], crops[2:], mean, std, seed=0)
    for got, want in zip(globals_ + locals_, crops):
        torch.testing.assert_close(got, want)
    # Always grayscale, always solarised: what the ops give on the [0, 1] images, normalised again.
    on = PhotometricViews(blur_probs=(0.0, 0.0, 0.0), solarize_prob=1.0, jitter_prob=0.0, grayscale_prob=1.0)
    globals_, _ = on(crops[:2], [], mean, std, seed=0)
    torch.testing.assert_close(globals_[0], normalise(TF.rgb_to_grayscale(images[0], 3), mean, std))
    expected = TF.solarize(TF.rgb_to_grayscale(images[1], 3), 128 / 255)
    torch.testing.assert_close(globals_[1], normalise(expected, mean, std))


def test_every_image_gets_the_same_view_on_any_number_of_ranks():
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.manual_seed(2)
    views = PhotometricViews()
    crops = [normalise(torch.rand(8, 3, 16, 16), mean, std) for _ in range(4)]
    whole_g, whole_l = views(crops[:2], crops[2:], mean, std, seed=5)
    assert not torch.allclose(whole_g[0], crops[0])
    for rank in (0, 1):
        part_g, part_l = views([c[rank::2] for c in crops[:2]], [c[rank::2] for c in crops[2:]], mean, std, 5, rank, 2)
        for got, want in zip(part_g + part_l, whole_g + whole_l):
            torch.testing.assert_close(got, want[rank::2])
    # The draws depend on the seed only, not on the global random state.
    torch.manual_seed(99)
    again_g, _ = views(crops[:2], crops[2:], mean, std, seed=5)
    torch.testing.assert_close(again_g[1], whole_g[1])
    assert _Draws(5, 0, 1).seed == 5
