"""One inference pass of a register ViT over a few images, measured for artifacts.

``scan`` runs the backbone once in eval mode without gradients and captures, with hooks, the
patch embedding (the input side of Fig. 5a), the pre-norm residual stream after every chosen
block, the stream entering the last block and the last block's attention probabilities; then
it turns them into the ``artifacts/...`` statistics of ``regablate.artifacts.stats``. The training
monitor, the attention-map callback and ``regablate inspect`` all go through it.

timm's fused attention (SDPA) never materialises attention probabilities, so the last block
runs its unfused path for this pass only (``fused_attn`` is switched back afterwards), and a
hook on its ``attn_drop`` (the identity in eval mode) reads the probabilities. Training keeps
the fused kernel.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from regablate.artifacts import stats
from regablate.artifacts.stats import Threshold
from regablate.errors import RegablateError
from regablate.models.backbone import block_index, eval_mode, extract_features


@dataclass
class ArtifactScan:
    """What one ``scan`` found; tensors are on the CPU.

    ``stats``: flat ``artifacts/...`` numbers (see ``stats.flatten_statistics``);
    ``patch_norms``: block -> ``(B, N)`` patch-token norms; ``cutoffs``: block -> outlier norm cutoff;
    ``outlier_positions``: block -> ``(h, w)`` share of images in which each position is an outlier;
    ``attention_maps``: ``(B, 1 + R, h, w)`` last-block attention of CLS and each register to the patches.
    """

    stats: dict[str, float]
    patch_norms: dict[int, Tensor]
    cutoffs: dict[int, float]
    outlier_positions: dict[int, Tensor]
    attention_maps: Tensor
    grid: tuple[int, int]


def scan(
    model: VisionTransformer,
    images: Tensor,
    *,
    threshold: Threshold = Threshold(),
    blocks: Sequence[int] | None = None,
    segmentation: Tensor | None = None,
) -> ArtifactScan:
    """Measure ``model``'s artifacts on ``images`` (B, 3, H, W), normalised as the model expects.

    ``blocks``: block indices to measure (negative ones count from the end; default all); the
    last block is always measured. ``segmentation``: optional ``(B, H, W)`` labels with 0 for
    background, which adds the outliers' background share.
    """
    depth = len(model.blocks)
    wanted = measured_blocks(depth, blocks)
    grid = tuple(model.patch_embed.dynamic_feat_size(tuple(images.shape[-2:])))
    num_prefix = model.num_prefix_tokens
    with torch.no_grad(), eval_mode(model), _captured(model) as captured:
        features = extract_features(model, images, blocks=wanted)
    per_block = features.blocks  # keyed by the wanted indices, 0..depth-1
    last = depth - 1
    background = None
    if segmentation is not None:
        background = stats.background_patches(segmentation.to(images.device), grid)

    block_stats, masks, norms, cutoffs = {}, {}, {}, {}
    for block, tokens in sorted(per_block.items()):
        block_stats[block], masks[block] = stats.block_statistics(tokens, num_prefix, threshold, background)
        norms[block] = stats.token_norms(tokens[:, num_prefix:])
        cutoffs[block] = threshold.cutoff(norms[block]).item()
    attention = captured["attention"]
    last_only = stats.outlier_evidence(
        last_tokens=per_block[last],
        last_mask=masks[last],
        embeddings=captured["embeddings"].flatten(1, -2),
        grid=grid,
        attention=attention,
        attention_input=captured["last_input"],
        num_prefix=num_prefix,
        threshold=threshold,
        background=background,
    )
    last_only.update(stats.register_attention(attention, num_prefix))
    return ArtifactScan(
        stats=stats.flatten_statistics(block_stats, last_only),
        patch_norms={b: n.cpu() for b, n in norms.items()},
        cutoffs=cutoffs,
        outlier_positions={b: stats.position_frequency(m, grid).cpu() for b, m in masks.items()},
        attention_maps=stats.cls_attention_maps(attention, num_prefix, grid).cpu(),
        grid=grid,
    )


def measured_blocks(depth: int, blocks: Sequence[int] | None) -> list[int]:
    """Block indices (``0..depth-1``) to measure: ``blocks`` (negative from the end; ``None``: all), and the last."""
    return sorted({*(block_index(b, depth) for b in (range(depth) if blocks is None else blocks)), depth - 1})


@contextmanager
def _captured(model: VisionTransformer) -> Iterator[dict[str, Tensor]]:
    """Hooks filling ``embeddings``, ``last_input`` and ``attention`` (last block) during one pass."""
    captured: dict[str, Tensor] = {}
    last = model.blocks[-1]
    attention = getattr(last, "attn", None)
    if not (hasattr(attention, "fused_attn") and isinstance(getattr(attention, "attn_drop", None), nn.Module)):
        raise RegablateError(
            f"cannot read attention maps of {type(last).__name__}: it has no timm Attention with attn_drop"
        )

    def keep(name: str, from_input: bool = False):  # noqa: ANN202 - a hook factory
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            captured[name] = (inputs[0] if from_input else output).detach()

        return hook

    handles = [
        model.patch_embed.register_forward_hook(keep("embeddings")),
        last.register_forward_hook(keep("last_input", from_input=True)),
        attention.attn_drop.register_forward_hook(keep("attention")),
    ]
    fused = attention.fused_attn
    attention.fused_attn = False
    try:
        yield captured
    finally:
        attention.fused_attn = fused
        for handle in handles:
            handle.remove()
