"""Pure tensor functions that measure ViT artifacts: high-norm outlier tokens and where attention goes.

Everything here works on tensors that a capture pass produced (see ``regablate.artifacts.scan``)
and returns tensors or flat ``{"artifacts/...": float}`` dicts, so the training monitor, the
attention-map callback, ``regablate inspect`` and the probes all compute the same numbers.

Token layout is regablate's ``[CLS, REG_1..REG_R, PATCH_1..PATCH_N]``, without the CLS for ViTs
that have none; functions that slice it take the model's ``TokenLayout``. Outliers are always
patch tokens: the paper measures patch norms, and registers are *meant* to hold high norms.

Telling register-style artifacts from other high-norm tokens (Darcet et al., Sec. 2 and Fig. 5):
artifacts sit on background, on patches that are redundant with their neighbours already at the
input, and attract a large share of attention. A small ViT trained hard can also grow high-norm
*foreground* tokens, which fail these tests; ``outlier_evidence`` measures all of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from regablate.errors import RegablateError
from regablate.models.layout import TokenLayout

THRESHOLD_MODES = ("relative", "absolute", "percentile")
# Relative: 4x the block's median patch norm. Artifacts sit near 10x (Fig. 3); normal tokens rarely
# pass 2-3x, and the absolute scale drifts ~10x during training, so a ratio is the safe default.
DEFAULT_THRESHOLD_VALUES = {"relative": 4.0, "absolute": 150.0, "percentile": 98.0}
# A block "has outliers" from this fraction of its patch tokens on (the paper sees ~2%).
ONSET_MIN_FRACTION = 0.005
# Channel concentration: the share of a token's squared norm held by its top 1% of channels.
TOP_CHANNEL_SHARE = 0.01


@dataclass(frozen=True)
class Threshold:
    """Which patch-token norms count as outliers.

    ``relative``: norm > ``value`` x the median patch norm of the same block (default 4);
    ``absolute``: norm > ``value`` (the paper uses 150 for DINOv2-g);
    ``percentile``: norm > the ``value``-th percentile of the block's patch norms (so the
    outlier fraction is fixed by construction: use it to look at *where* the top tokens are).
    """

    mode: str = "relative"
    value: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in THRESHOLD_MODES:
            raise RegablateError(f"unknown threshold mode {self.mode!r}; use one of {', '.join(THRESHOLD_MODES)}")
        value = float(DEFAULT_THRESHOLD_VALUES[self.mode] if self.value is None else self.value)
        if not math.isfinite(value) or value <= 0 or (self.mode == "percentile" and value >= 100):
            allowed = "between 0 and 100 (exclusive)" if self.mode == "percentile" else "a positive number"
            raise RegablateError(f"threshold value for mode {self.mode!r} must be {allowed}, got {value:g}")
        object.__setattr__(self, "value", value)

    def cutoff(self, patch_norms: Tensor) -> Tensor:
        """The norm above which a patch token of this block is an outlier (a 0-d tensor)."""
        return self.cutoffs(patch_norms[None])[0]

    def cutoffs(self, patch_norms: Tensor) -> Tensor:
        """One cutoff per leading index (a block) of ``(K, ...)`` patch norms: ``(K,)``."""
        norms = patch_norms.detach().flatten(1).float()
        value = float(self.value or 0.0)  # never None after __post_init__
        if self.mode == "absolute":
            return norms.new_full((len(norms),), value)
        if self.mode == "relative":
            return value * norms.median(dim=1).values
        return torch.quantile(norms, value / 100.0, dim=1)

    def describe(self) -> str:
        if self.mode == "absolute":
            return f"norm > {self.value:g}"
        if self.mode == "relative":
            return f"norm > {self.value:g}x the block's median patch norm"
        return f"norm above the {self.value:g}th percentile"


def token_norms(tokens: Tensor) -> Tensor:
    """L2 norm of each token: ``(..., T, D) -> (..., T)``, in float32."""
    return tokens.float().norm(dim=-1)


def outlier_mask(patch_norms: Tensor, threshold: Threshold) -> Tensor:
    """Boolean mask of the outlier patch tokens (same shape as ``patch_norms``)."""
    return patch_norms > threshold.cutoff(patch_norms)


def outlier_fraction(mask: Tensor) -> float:
    """Share of tokens that are outliers."""
    return mask.float().mean().item() if mask.numel() else 0.0


def position_frequency(mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """How often each patch position is an outlier over the images: ``(B, N) -> (h, w)`` in [0, 1]."""
    return mask.float().mean(dim=0).reshape(grid)


def background_patches(segmentation: Tensor, grid: tuple[int, int]) -> Tensor:
    """Patches that are mostly background: ``(B, H, W)`` labels with 0 = background -> ``(B, N)`` bool."""
    background = (segmentation == 0).float().unsqueeze(1)
    return (F.adaptive_avg_pool2d(background, grid) > 0.5).flatten(1)


def neighbour_cosine(patch_tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Mean cosine similarity of each patch to its (up to 4) grid neighbours: ``(B, N, D) -> (B, N)``.

    Computed on the patch embedding, it says how redundant a patch is at the input (Fig. 5a).
    """
    b, _, d = patch_tokens.shape
    x = F.normalize(patch_tokens.float(), dim=-1).reshape(b, *grid, d)
    total = torch.zeros(b, *grid, device=x.device)
    count = torch.zeros(grid, device=x.device)
    for axis, size in ((1, grid[0]), (2, grid[1])):
        similarity = (x.narrow(axis, 0, size - 1) * x.narrow(axis, 1, size - 1)).sum(-1)
        for start in (0, 1):  # each pair counts for both of its tokens
            total.narrow(axis, start, size - 1).add_(similarity)
            count.narrow(axis - 1, start, size - 1).add_(1.0)
    return (total / count.clamp_min(1)).flatten(1)


def channel_concentration(tokens: Tensor, share: float = TOP_CHANNEL_SHARE) -> Tensor:
    """Share of each token's squared norm held by its top ``share`` of channels (at least one).

    Artifacts store their norm in a few channels ("register neurons"); ordinary tokens spread it.
    """
    squared = tokens.float().square()
    k = max(1, math.ceil(share * squared.shape[-1]))
    return squared.topk(k, dim=-1).values.sum(-1) / squared.sum(-1).clamp_min(1e-12)


def attention_received(attention: Tensor, keys: Tensor) -> float:
    """Share of the attention of all *other* tokens that goes to the ``keys`` tokens.

    ``attention``: ``(B, heads, T, T)`` probabilities of one block; ``keys``: ``(B, T)`` bool.
    Queries among ``keys`` are left out, so a token attending to itself does not count.
    """
    mass = (attention.float().mean(dim=1) * keys.unsqueeze(1).float()).sum(-1)  # (B, T) per query
    queries = ~keys
    return mass[queries].mean().item() if queries.any() else 0.0


def query_attention_maps(
    attention: Tensor, layout: TokenLayout, grid: tuple[int, int], pool_attention: Tensor | None = None
) -> Tensor:
    """Head-mean attention to the patches of the global query and of each register: ``(B, 1 + R, h, w)``.

    The global query is the class token. A ViT without one has none in its blocks, so the first
    map is what its global feature looks at: ``pool_attention`` ``(B, N)`` when given (the
    attention pool's latent query of a ``map`` model, see ``regablate.artifacts.scan``), else the
    attention each patch receives from the patch queries, averaged over them (an avg-pooled model
    weighs every patch alike, so that is where its attention, and so its global feature, goes).
    """
    mean = attention.float().mean(dim=1)  # (B, T queries, T keys)
    to_patches = mean[:, :, layout.patches]
    if layout.has_cls:
        first = to_patches[:, layout.cls_index]
    elif pool_attention is not None:
        first = pool_attention.float()
    else:
        first = to_patches[:, layout.patches].mean(dim=1)
    maps = torch.cat([first[:, None], to_patches[:, layout.registers]], dim=1)
    return maps.reshape(attention.shape[0], maps.shape[1], *grid)


def onset_block(fractions: dict[int, float], min_fraction: float = ONSET_MIN_FRACTION) -> int | None:
    """The first block from which every later block has at least ``min_fraction`` outliers."""
    onset = None
    for block in sorted(fractions, reverse=True):
        if fractions[block] < min_fraction:
            break
        onset = block
    return onset


def block_key(name: str, block: int, prefix: str = "artifacts") -> str:
    return f"{prefix}/{name}/block_{block:02d}"


def norm_statistics(norms: Tensor, layout: TokenLayout, threshold: Threshold) -> tuple[list[dict[str, float]], Tensor]:
    """Statistics of ``K`` blocks' ``(K, B, T)`` token norms, one dict per block, and the ``(K, B, N)`` outlier masks.

    Keys (no prefix): ``outlier_frac``, ``norm_max_over_median``, ``patch_norm_median`` and, with
    registers, ``register_norm_mean`` / ``register_norm_max``. All blocks are computed together
    and leave the device in one transfer (a GPU waits once per measurement, not once per number).
    """
    patch_norms = norms[..., layout.patches].float()
    mask = patch_norms > threshold.cutoffs(patch_norms)[:, None, None]
    flat = patch_norms.flatten(1)
    median = flat.median(dim=1).values
    columns = {
        "outlier_frac": mask.flatten(1).float().mean(dim=1),
        "norm_max_over_median": flat.max(dim=1).values / median.clamp_min(1e-12),
        "patch_norm_median": median,
    }
    if layout.num_all_registers:
        register_norms = norms[..., layout.registers].float().flatten(1)
        columns["register_norm_mean"] = register_norms.mean(dim=1)
        columns["register_norm_max"] = register_norms.max(dim=1).values
    rows = torch.stack(list(columns.values()), dim=1).tolist()
    return [dict(zip(columns, row)) for row in rows], mask


def block_statistics(
    tokens: Tensor, layout: TokenLayout, threshold: Threshold, background: Tensor | None = None
) -> tuple[dict[str, float], Tensor]:
    """Statistics of one block's ``(B, T, D)`` residual stream, and its ``(B, N)`` outlier mask.

    The keys of ``norm_statistics``, and for blocks with outliers ``outlier_channel_concentration``
    and, given a ``(B, N)`` ``background`` mask, ``outlier_background_share``.
    """
    per_block, masks = norm_statistics(token_norms(tokens)[None], layout, threshold)
    stats, mask = per_block[0], masks[0]
    if mask.any():
        stats["outlier_channel_concentration"] = channel_concentration(tokens[:, layout.patches][mask]).mean().item()
        if background is not None:
            stats["outlier_background_share"] = background[mask].float().mean().item()
    return stats, mask


def outlier_evidence(
    *,
    last_tokens: Tensor,
    last_mask: Tensor,
    embeddings: Tensor,
    grid: tuple[int, int],
    attention: Tensor,
    attention_input: Tensor,
    layout: TokenLayout,
    threshold: Threshold,
    background: Tensor | None = None,
) -> dict[str, float]:
    """What tells the last block's outliers apart, each beside its value for ordinary patches.

    ``outlier_neighbour_cosine`` vs ``patch_neighbour_cosine`` (input redundancy, Fig. 5a);
    ``patch_channel_concentration`` (non-outliers, to compare with ``outlier_channel_concentration``);
    ``patch_background_share`` (to compare with ``outlier_background_share``);
    ``outlier_attention_share``: the share of the last block's attention (other queries, head mean)
    that goes to the tokens that are outliers in the stream *entering* it, and
    ``outlier_attention_lift``: that share over the share those tokens would get from uniform attention.
    """
    cosine = neighbour_cosine(embeddings, grid)
    stats = {"patch_neighbour_cosine": cosine.mean().item()}
    patches = last_tokens[:, layout.patches]
    if (~last_mask).any():
        stats["patch_channel_concentration"] = channel_concentration(patches[~last_mask]).mean().item()
    if background is not None:
        stats["patch_background_share"] = background.float().mean().item()
    if last_mask.any():
        stats["outlier_neighbour_cosine"] = cosine[last_mask].mean().item()
    entering = outlier_mask(token_norms(attention_input[:, layout.patches]), threshold)
    if entering.any():
        keys = F.pad(entering, (layout.num_prefix, 0))
        share = attention_received(attention, keys)
        stats["outlier_attention_share"] = share
        # Uniform attention from a non-outlier query spreads over all T tokens.
        stats["outlier_attention_lift"] = share / (keys.float().sum(-1).mean().item() / keys.shape[1])
    return stats


def register_attention(attention: Tensor, layout: TokenLayout) -> dict[str, float]:
    """The share of attention (head mean) that goes to the registers: ``cls_register_attention`` from
    the class token, ``patch_register_attention`` from the patches (averaged over them)."""
    if not layout.num_all_registers:
        return {}
    to_registers = attention.float().mean(dim=1)[:, :, layout.registers].sum(-1)  # (B, T) per query
    stats = {"patch_register_attention": to_registers[:, layout.patches].mean().item()}
    if layout.has_cls:
        stats["cls_register_attention"] = to_registers[:, layout.cls_index].mean().item()
    return stats


def flatten_statistics(
    per_block: dict[int, dict[str, float]], last: dict[str, float], prefix: str = "artifacts"
) -> dict[str, float]:
    """``{"PREFIX/NAME/block_NN": v}`` for every block, ``{"PREFIX/NAME": v}`` for the last block.

    ``last`` holds statistics measured for the last block only; ``PREFIX/outlier_onset_block``
    is added when some block has outliers.
    """
    flat: dict[str, float] = {}
    for block, stats in sorted(per_block.items()):
        flat.update({block_key(name, block, prefix): value for name, value in stats.items()})
    last_block = max(per_block)
    flat.update({f"{prefix}/{name}": value for name, value in {**per_block[last_block], **last}.items()})
    onset = onset_block({block: stats["outlier_frac"] for block, stats in per_block.items()})
    if onset is not None:
        flat[f"{prefix}/outlier_onset_block"] = float(onset)
    return flat


def summary_keys(flat: dict[str, float], per_block: Sequence[str] = ("outlier_frac",)) -> dict[str, float]:
    """The statistics worth keeping in ``summary.json``: last-block values and the chosen per-block ones."""
    return {key: value for key, value in flat.items() if "/block_" not in key or key.rsplit("/", 2)[-2] in per_block}
