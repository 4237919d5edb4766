"""regablate.artifacts.stats on hand-made tensors, and the scan on a ViT with planted artifacts."""

import pytest
import torch

from regablate.artifacts import stats as artifacts
from regablate.artifacts.register_neurons import NeuronSearch, add_test_time_register, find_register_neurons
from regablate.artifacts.scan import pool_attention, scan
from regablate.artifacts.stats import Threshold
from regablate.artifacts.verdict import decide, summary_lines
from regablate.data import SyntheticScenesDataset
from regablate.errors import RegablateError
from regablate.models import TokenLayout, extract_features
from tests.planted import CORNERS, plant_artifacts, tiny_vit

GRID = (8, 8)


def norms_with_outliers() -> torch.Tensor:
    """100 norms: 95 ordinary ones between 1 and 2, and 5 at 12, 30, 160, 200, 300 (indices 95..99)."""
    return torch.cat([torch.linspace(1.0, 2.0, 95), torch.tensor([12.0, 30.0, 160.0, 200.0, 300.0])]).view(4, 25)


@pytest.mark.parametrize(
    "threshold, expected",
    [
        (Threshold(), [95, 96, 97, 98, 99]),  # 4x the median (~1.5) = 6
        (Threshold("relative", 10.0), [96, 97, 98, 99]),  # 15
        (Threshold("absolute", 150.0), [97, 98, 99]),  # the paper's cutoff
        (Threshold("percentile", 98.0), [98, 99]),  # the top 2%
    ],
    ids=["relative-default", "relative-10", "absolute-150", "percentile-98"],
)
def test_threshold_modes_pick_the_expected_tokens(threshold, expected):
    norms = norms_with_outliers()
    mask = artifacts.outlier_mask(norms, threshold)
    assert mask.shape == norms.shape
    assert mask.flatten().nonzero().flatten().tolist() == expected
    assert artifacts.outlier_fraction(mask) == pytest.approx(len(expected) / 100)


def test_relative_threshold_follows_the_scale_of_the_norms():
    norms = norms_with_outliers()
    assert torch.equal(artifacts.outlier_mask(norms, Threshold()), artifacts.outlier_mask(norms * 10, Threshold()))
    assert not artifacts.outlier_mask(norms / 10, Threshold("absolute", 150.0)).any()


def test_threshold_defaults_and_bad_values():
    assert Threshold().value == 4.0 and Threshold("absolute").value == 150.0 and Threshold("percentile").value == 98.0
    with pytest.raises(RegablateError, match="unknown threshold mode 'median'.*relative, absolute, percentile"):
        Threshold("median")
    for mode, value in [("percentile", 100.0), ("relative", 0.0), ("absolute", -1.0)]:
        with pytest.raises(RegablateError, match=f"threshold value for mode '{mode}'"):
            Threshold(mode, value)


def test_norm_statistics_of_one_block_and_token_norms():
    # Two blocks of one image: CLS, 2 registers, 4 patches.
    norms = torch.tensor([[[9.0, 3.0, 5.0, 1.0, 2.0, 2.0, 20.0]], [[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]])
    layout = TokenLayout(has_cls=True, num_registers=2)
    stats, mask = artifacts.norm_statistics(norms, layout, threshold=Threshold("relative", 4.0))
    assert stats[0] == pytest.approx(
        {
            "outlier_frac": 0.25,
            "norm_max_over_median": 10.0,
            "patch_norm_median": 2.0,
            "register_norm_mean": 4.0,
            "register_norm_max": 5.0,
        }
    )
    assert stats[1]["outlier_frac"] == 0.0 and stats[1]["norm_max_over_median"] == 1.0
    assert mask.tolist() == [[[False, False, False, True]], [[False] * 4]]
    # Each block gets its own cutoff, as if measured alone.
    for mode in ("relative", "absolute", "percentile"):
        threshold = Threshold(mode, 50.0 if mode == "percentile" else 1.5)
        assert torch.equal(
            threshold.cutoffs(norms[..., 3:]), torch.stack([threshold.cutoff(n[..., 3:]) for n in norms])
        )
    no_registers, _ = artifacts.norm_statistics(norms[:, :, 2:], TokenLayout(True, 0), threshold=Threshold())
    assert "register_norm_mean" not in no_registers[0]
    # Without a class token the registers come first: the same numbers from [REG, REG, PATCH x 4].
    no_cls, no_cls_mask = artifacts.norm_statistics(norms[:, :, 1:], TokenLayout(False, 2), threshold=Threshold())
    assert no_cls[0] == pytest.approx(stats[0]) and torch.equal(no_cls_mask, mask)
    tokens = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])
    assert torch.equal(artifacts.token_norms(tokens), torch.tensor([[5.0, 1.0]]))


def test_neighbour_cosine_counts_only_existing_neighbours():
    same = torch.ones(1, 9, 4)
    assert torch.allclose(artifacts.neighbour_cosine(same, (3, 3)), torch.ones(1, 9))
    # A checkerboard of opposite vectors: every neighbour points the other way.
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0]).view(1, 9, 1)
    assert torch.allclose(artifacts.neighbour_cosine(same * signs, (3, 3)), -torch.ones(1, 9))
    # One odd patch in a corner: it disagrees with both of its neighbours, they with one of their 3.
    odd = same.clone()
    odd[0, 0] = -1.0
    cosine = artifacts.neighbour_cosine(odd, (3, 3)).view(3, 3)
    assert (
        cosine[0, 0] == pytest.approx(-1.0)
        and cosine[0, 1] == pytest.approx(1 / 3)
        and cosine[2, 2] == pytest.approx(1.0)
    )


def test_channel_concentration_background_positions_and_onset():
    one_hot = torch.zeros(2, 200)
    one_hot[:, 7] = 5.0
    assert torch.allclose(artifacts.channel_concentration(one_hot), torch.ones(2))  # top 1% = 2 channels
    assert artifacts.channel_concentration(torch.ones(1, 200)).item() == pytest.approx(2 / 200)
    segmentation = torch.zeros(1, 8, 8, dtype=torch.long)
    segmentation[0, :4, :4] = 3  # the top-left patch of a 2x2 grid is an object
    assert artifacts.background_patches(segmentation, (2, 2)).tolist() == [[False, True, True, True]]
    mask = torch.tensor([[True, False, False, True], [True, False, False, False]])
    assert artifacts.position_frequency(mask, (2, 2)).tolist() == [[1.0, 0.0], [0.0, 0.5]]
    assert artifacts.onset_block({0: 0.0, 1: 0.02, 2: 0.0, 3: 0.02, 4: 0.03}) == 3
    assert artifacts.onset_block({0: 0.0, 1: 0.02, 2: 0.0}) is None


def test_attention_received_leaves_out_the_keys_as_queries():
    attention = torch.zeros(1, 1, 3, 3)
    attention[0, 0, :, 2] = 1.0  # everybody looks at token 2
    keys = torch.tensor([[False, False, True]])
    assert artifacts.attention_received(attention, keys) == pytest.approx(1.0)
    attention[0, 0, 1] = torch.tensor([0.5, 0.5, 0.0])
    assert artifacts.attention_received(attention, keys) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def scenes():
    data = SyntheticScenesDataset(split="val", size=16, img_size=32)
    samples = [data[i] for i in range(16)]
    return torch.stack([s["image"] for s in samples]), torch.stack([s["mask"] for s in samples])


def test_scan_finds_planted_artifacts_in_the_right_blocks_and_positions(scenes):
    images, segmentation = scenes
    model = plant_artifacts(tiny_vit(), onset=1)
    result = scan(model, images, segmentation=segmentation)
    stats = result.stats
    planted = torch.zeros(64)
    planted[list(CORNERS)] = 1.0
    assert not result.outlier_positions[0].any()
    for block in (1, 2, 3):
        assert torch.equal(result.outlier_positions[block].flatten(), planted), block
        assert stats[f"artifacts/outlier_frac/block_{block:02d}"] == pytest.approx(4 / 64)
    assert stats["artifacts/outlier_frac/block_00"] == 0.0
    assert stats["artifacts/outlier_frac"] == pytest.approx(4 / 64)
    assert stats["artifacts/outlier_onset_block"] == 1.0
    assert stats["artifacts/norm_max_over_median"] > 20
    # What tells them apart: one channel, background, redundant input patches, an attention sink.
    assert stats["artifacts/outlier_channel_concentration"] > 0.95 > stats["artifacts/patch_channel_concentration"]
    expected_background = artifacts.background_patches(segmentation, GRID)[:, list(CORNERS)].float().mean().item()
    assert stats["artifacts/outlier_background_share"] == pytest.approx(expected_background)
    # Input redundancy: the planted corners' patch embeddings against their neighbours, computed by hand.
    with torch.no_grad():
        cosine = artifacts.neighbour_cosine(model.patch_embed(images), GRID)
    corners = cosine[:, list(CORNERS)].mean().item()
    assert stats["artifacts/outlier_neighbour_cosine"] == pytest.approx(corners, rel=1e-5)
    assert stats["artifacts/patch_neighbour_cosine"] == pytest.approx(cosine.mean().item(), rel=1e-5)
    assert stats["artifacts/outlier_attention_share"] > 0.5 and stats["artifacts/outlier_attention_lift"] > 5
    # The attention maps: every image's CLS looks hardest at a planted corner.
    brightest = result.attention_maps[:, 0].flatten(1).argmax(dim=1)
    assert all(int(p) in CORNERS for p in brightest)
    assert result.attention_maps.shape == (16, 3, 8, 8)
    assert (result.patch_norms[3][:, list(CORNERS)] > result.cutoffs[3]).all()
    assert model.blocks[-1].attn.fused_attn and model.training, "the scan must leave the model as it was"


def test_untouched_model_shows_no_artifacts(scenes):
    images, segmentation = scenes
    stats = scan(tiny_vit(), images, segmentation=segmentation).stats
    assert all(stats[f"artifacts/outlier_frac/block_{b:02d}"] == 0.0 for b in range(4))
    assert stats["artifacts/norm_max_over_median"] < 4
    assert "artifacts/outlier_onset_block" not in stats and "artifacts/outlier_attention_share" not in stats


def test_scan_rejects_a_block_out_of_range(scenes):
    with pytest.raises(RegablateError, match="block index 4 is out of range for a ViT with 4 blocks"):
        scan(tiny_vit(), scenes[0][:2], blocks=[0, 4])


# --- ViTs without a class token -------------------------------------------------------------------


def test_query_attention_maps_for_each_layout():
    # One image, one head, tokens [prefix.., 4 patches on a 2x2 grid]; rows are queries.
    torch.manual_seed(0)
    attention = torch.rand(1, 1, 7, 7).softmax(-1)
    with_cls = artifacts.query_attention_maps(attention, TokenLayout(True, 2), (2, 2))
    assert with_cls.shape == (1, 3, 2, 2)
    assert torch.equal(with_cls[0, 0].flatten(), attention[0, 0, 0, 3:])  # CLS's row
    assert torch.equal(with_cls[0, 2].flatten(), attention[0, 0, 2, 3:])  # the second register's row
    # Without CLS ([REG, REG, REG, PATCH x 4]): the attention the patches receive, mean over the patch queries.
    avg = artifacts.query_attention_maps(attention, TokenLayout(False, 3), (2, 2))
    assert avg.shape == (1, 4, 2, 2)
    torch.testing.assert_close(avg[0, 0].flatten(), attention[0, 0, 3:, 3:].mean(dim=0))
    assert torch.equal(avg[0, 1].flatten(), attention[0, 0, 0, 3:])
    pooled = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    assert torch.equal(
        artifacts.query_attention_maps(attention, TokenLayout(False, 3), (2, 2), pooled)[0, 0], pooled.view(2, 2)
    )


def test_pool_attention_reproduces_the_attention_pool_exactly():
    model = tiny_vit(0, class_token=False, global_pool="map").eval()
    pool = model.attn_pool
    patches = torch.randn(3, 64, 32)
    with torch.no_grad():
        probs = pool_attention(pool, patches)  # (B, heads, latents, N)
        v = pool.kv(patches).reshape(3, 64, 2, pool.num_heads, pool.head_dim)[:, :, 1].transpose(1, 2)
        x = pool.proj((probs @ v).transpose(1, 2).reshape(3, pool.latent_len, 32))
        rebuilt = (x + pool.mlp(pool.norm(x)))[:, 0]
        torch.testing.assert_close(rebuilt, pool(patches))
    assert probs.shape == (3, 2, 1, 64) and torch.allclose(probs.sum(-1), torch.ones(3, 2, 1))


@pytest.mark.parametrize("pool", ["avg", "map"])
def test_scan_finds_planted_artifacts_without_a_class_token(scenes, pool):
    images, segmentation = scenes
    model = plant_artifacts(tiny_vit(2, class_token=False, global_pool=pool), onset=1)
    result = scan(model, images, segmentation=segmentation)
    stats = result.stats
    for block in (1, 2, 3):
        assert stats[f"artifacts/outlier_frac/block_{block:02d}"] == pytest.approx(4 / 64), block
    assert stats["artifacts/outlier_frac/block_00"] == 0.0 and stats["artifacts/outlier_onset_block"] == 1.0
    assert stats["artifacts/outlier_attention_lift"] > 5 and "artifacts/register_norm_mean" in stats
    assert "artifacts/cls_register_attention" not in stats and 0 <= stats["artifacts/patch_register_attention"] < 1
    # The global query (the attention pool's, or the patches' for avg pooling) looks hardest at a planted corner.
    assert result.attention_maps.shape == (16, 3, 8, 8)
    brightest = result.attention_maps[:, 0].flatten(1).argmax(dim=1)
    assert all(int(p) in CORNERS for p in brightest)
    assert result.outliers.shape == (16, 64) and result.outliers[:, list(CORNERS)].all()
    assert result.outliers.sum() == 16 * 4


def test_scan_of_a_clean_model_without_class_token_finds_nothing(scenes):
    stats = scan(tiny_vit(0, class_token=False, global_pool="map"), scenes[0]).stats
    assert stats["artifacts/outlier_frac"] == 0.0 and "artifacts/register_norm_mean" not in stats


# --- the verdict ------------------------------------------------------------------------------------

REGISTER_STYLE = {
    "artifacts/outlier_frac": 0.06,
    "artifacts/outlier_onset_block": 1.0,
    "artifacts/norm_max_over_median": 12.0,
    "artifacts/patch_norm_median": 10.0,
    "artifacts/register_norm_mean": 30.0,
    "artifacts/register_norm_max": 45.0,
    "artifacts/outlier_background_share": 0.97,
    "artifacts/patch_background_share": 0.7,
    "artifacts/outlier_neighbour_cosine": 0.9,
    "artifacts/patch_neighbour_cosine": 0.6,
    "artifacts/outlier_channel_concentration": 0.95,
    "artifacts/patch_channel_concentration": 0.1,
    "artifacts/outlier_attention_share": 0.6,
    "artifacts/outlier_attention_lift": 8.0,
}
# High-norm foreground features (a small ViT trained hard): on objects, ordinary inputs, spread norm, no sink.
FOREGROUND = {
    **REGISTER_STYLE,
    "artifacts/outlier_background_share": 0.2,
    "artifacts/outlier_neighbour_cosine": 0.5,
    "artifacts/outlier_channel_concentration": 0.11,
    "artifacts/outlier_attention_share": 0.06,
    "artifacts/outlier_attention_lift": 1.0,
}


def test_verdict_register_style_with_every_number_behind_it():
    verdict = decide(REGISTER_STYLE)
    assert verdict.label == "register-style" and verdict.score == 6 == verdict.max_score
    assert verdict.onset_block == 1 and verdict.background_test == "run"
    assert verdict.registers == pytest.approx({"norm_mean": 30.0, "norm_max": 45.0, "over_patch_median": 3.0})
    saved = verdict.to_json()
    assert saved["tests"]["background"] == {
        "vote": 1,
        "says": "97% of them sit on background (all patches 70%)",
        "outliers": 0.97,
        "patches": 0.7,
        "side": "for",
        "weight": 2,
    }
    assert {name: t["side"] for name, t in saved["tests"].items()} == {
        "background": "for",
        "attention": "for",
        "input redundancy": "for",
        "channels": "for",
    }
    lines = summary_lines(REGISTER_STYLE, verdict, Threshold(), 4)
    assert lines[-1] == "verdict          : register-style artifacts (score +6 of 6; for: " + (
        "background, attention, input redundancy, channels)"
    )
    assert verdict.reason.startswith("97% of them sit on background (all patches 70%); they draw 60%")
    assert any(line.startswith("attention        : they draw 60% of last-block attention, 8.0x") for line in lines)
    assert any("registers        : norm mean 30, max 45 (3.0x the median patch norm)" in line for line in lines)


def test_verdict_high_norm_foreground_features_are_not_register_style():
    verdict = decide(FOREGROUND)
    assert verdict.label == "not register-style" and verdict.score == -6
    assert "they sit on objects at least as often as other patches" in verdict.reason
    assert "little attention" in verdict.reason
    line = summary_lines(FOREGROUND, verdict, Threshold(), 4)[-1]
    assert line == "verdict          : high-norm tokens, not register-style (score -6 of 6; against: " + (
        "background, attention, input redundancy, channels)"
    )


def test_verdict_without_masks_decides_from_the_rest_and_says_so():
    no_masks = {k: v for k, v in REGISTER_STYLE.items() if "background" not in k}
    verdict = decide(no_masks)
    assert verdict.label == "register-style" and verdict.max_score == 4
    assert verdict.background_test.startswith("not run: no masks")
    assert "background       : not run: no masks" in "\n".join(summary_lines(no_masks, verdict, Threshold(), 4))
    assert decide({k: v for k, v in FOREGROUND.items() if "background" not in k}).label == "not register-style"


def test_verdict_weighs_the_evidence():
    # A sink on background whose inputs are not redundant: the two strong tests outweigh the weak one.
    mixed = {**REGISTER_STYLE, "artifacts/outlier_neighbour_cosine": 0.5}
    assert decide(mixed).label == "register-style" and decide(mixed).score == 4
    # Everything else looks register-style, but nothing attends to them: the attention test decides.
    no_sink = {**REGISTER_STYLE, "artifacts/outlier_attention_lift": 1.1}
    verdict = decide(no_sink)
    assert (
        verdict.label == "not register-style" and verdict.score == 2 and verdict.reason.startswith("they draw little")
    )
    # Outliers that only appear in the last block's output are never read by attention.
    late = {k: v for k, v in REGISTER_STYLE.items() if "attention" not in k}
    assert decide(late).label == "not register-style" and "no attention ever reads them" in decide(late).reason
    # In between the thresholds a test votes neither way.
    middle = {**REGISTER_STYLE, "artifacts/outlier_background_share": 0.8, "artifacts/outlier_attention_lift": 2.0}
    assert {v.test: v.vote for v in decide(middle).votes}["background"] == 0 and decide(middle).score == 2


def test_verdict_no_outliers_notes_registers_that_took_over():
    clean = {**REGISTER_STYLE, "artifacts/outlier_frac": 0.001}
    verdict = decide(clean)
    assert verdict.label == "no outliers" and verdict.votes == [] and "3.0x the median patch norm" in verdict.reason
    assert summary_lines(clean, verdict, Threshold(), 4)[-1].startswith("verdict          : no artifacts, no outliers")
    assert "registers" not in decide({**clean, "artifacts/register_norm_mean": 11.0}).reason


@pytest.mark.parametrize(
    "planted, label", [("register-style", "register-style"), ("no sink", "not register-style"), (None, "no outliers")]
)
def test_verdict_on_scans_of_planted_models(scenes, planted, label):
    images, segmentation = scenes
    model = tiny_vit()
    if planted:
        plant_artifacts(model, onset=1, sink=planted == "register-style")
    assert decide(scan(model, images, segmentation=segmentation).stats).label == label


@pytest.mark.parametrize("registers", [0, 2])
def test_a_test_time_register_takes_the_artifacts_of_a_vit_without_class_token(scenes, registers):
    images = scenes[0]
    model = plant_artifacts(tiny_vit(registers, class_token=False, global_pool="avg"), onset=1, units=(3, 9)).eval()
    neurons = find_register_neurons(model, images, NeuronSearch(top_k=2))
    assert set(neurons.units) == {(1, 3), (1, 9)}
    add_test_time_register(model, neurons)
    layout = TokenLayout.of(model)
    assert layout == TokenLayout(False, registers, 1) and layout.num_prefix == registers + 1  # [REG.., TTR, PATCH]
    stats = scan(model, images).stats
    assert all(stats[f"artifacts/outlier_frac/block_{b:02d}"] == 0.0 for b in range(4))
    assert stats["artifacts/register_norm_max"] > 20, "the extra token holds the high norm now"
    with torch.no_grad():
        features = extract_features(model, images)
    assert features.registers.shape[1] == registers + 1 and features.patches.shape[1] == 64
