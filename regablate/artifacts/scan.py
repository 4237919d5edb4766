"""One inference pass of a register ViT over a few images, measured for artifacts.

``scan`` runs the backbone once in eval mode without gradients and captures, with hooks, the
patch embedding (the input side of Fig. 5a), the pre-norm residual stream after every chosen
block, the stream entering the last block and the last block's attention probabilities; then
it turns them into the ``artifacts/...`` statistics of ``regablate.artifacts.stats``. The training
monitor, the attention-map callback and ``regablate inspect`` all go through it.

timm's fused attention (SDPA) never materialises attention probabilities, so the last block
runs its unfused path for this pass only (``fused_attn`` is switched back afterwards), and a
hook on its ``attn_drop`` (the identity in eval mode) reads the probabilities. Training keeps
the fused kernel. With compiled blocks (a task's ``compile``), the pass runs eagerly
(``regablate.models.compiled.uncompiled``): both changes sit inside a block, and a compiled
block would compile a graph for them.

Attention maps show where the global query looks: the class token's row, or for a ViT without
one, the attention pool's latent query over the final patch tokens (``map`` models such as
SigLIP; recomputed from the pool's own projections by :func:`pool_attention`) or the attention
the patches receive from the patch queries (``avg``/``max`` pooling); then one map per register.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import AttentionPoolLatent
from torch import Tensor, nn

from regablate.artifacts import stats
from regablate.artifacts.stats import Threshold
from regablate.errors import RegablateError
from regablate.models.backbone import block_index, eval_mode, extract_features
from regablate.models.compiled import uncompiled
from regablate.models.layout import Backbone, TokenLayout


@dataclass
class ArtifactScan:
    """What one ``scan`` found; tensors are on the CPU.

    ``stats``: flat ``artifacts/...`` numbers (see ``stats.flatten_statistics``);
    ``patch_norms``: block -> ``(B, N)`` patch-token norms; ``cutoffs``: block -> outlier norm cutoff;
    ``outlier_positions``: block -> ``(h, w)`` share of images in which each position is an outlier;
    ``outliers``: ``(B, N)`` the last block's outlier patches of each image;
    ``attention_maps``: ``(B, 1 + R, h, w)`` attention of the global query (see the module docstring)
    and of each register to the patches.
    """

    stats: dict[str, float]
    patch_norms: dict[int, Tensor]
    cutoffs: dict[int, float]
    outlier_positions: dict[int, Tensor]
    outliers: Tensor
    attention_maps: Tensor
    grid: tuple[int, int]


def scan(
    model: Backbone,
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
    grid = tuple(model.patch_embed.dynamic_feat_size((images.shape[-2], images.shape[-1])))
    layout = TokenLayout.of(model)
    with torch.no_grad(), uncompiled(), eval_mode(model), _captured(model) as captured:
        features = extract_features(model, images, blocks=wanted)
        pooled_map = None
        if model.attn_pool is not None:  # a map model's global query: the pool's latent(s), head mean
            pooled_map = pool_attention(model.attn_pool, features.patches).mean(dim=(1, 2))
    per_block = features.blocks  # keyed by the wanted indices, 0..depth-1
    last = depth - 1
    background = None
    if segmentation is not None:
        background = stats.background_patches(segmentation.to(images.device), grid)

    block_stats, masks, norms, cutoffs = {}, {}, {}, {}
    for block, tokens in sorted(per_block.items()):
        block_stats[block], masks[block] = stats.block_statistics(tokens, layout, threshold, background)
        norms[block] = stats.token_norms(tokens[:, layout.patches])
        cutoffs[block] = threshold.cutoff(norms[block]).item()
    attention = captured["attention"]
    last_only = stats.outlier_evidence(
        last_tokens=per_block[last],
        last_mask=masks[last],
        embeddings=captured["embeddings"].flatten(1, -2),
        grid=grid,
        attention=attention,
        attention_input=captured["last_input"],
        layout=layout,
        threshold=threshold,
        background=background,
    )
    last_only.update(stats.register_attention(attention, layout))
    return ArtifactScan(
        stats=stats.flatten_statistics(block_stats, last_only),
        patch_norms={b: n.cpu() for b, n in norms.items()},
        cutoffs=cutoffs,
        outlier_positions={b: stats.position_frequency(m, grid).cpu() for b, m in masks.items()},
        outliers=masks[last].cpu(),
        attention_maps=stats.query_attention_maps(attention, layout, grid, pooled_map).cpu(),
        grid=grid,
    )


def pool_attention(pool: AttentionPoolLatent, patches: Tensor) -> Tensor:
    """Attention probabilities of timm's ``AttentionPoolLatent`` queries over ``patches`` ``(B, N, D)``.

    Returns ``(B, heads, latents, N)``. The pool's own forward runs the fused kernel and keeps no
    probabilities, so they are computed here from its projections, as its unfused path computes them.
    """
    b, n, _ = patches.shape
    x = patches if pool.pos_embed is None else patches + pool.pos_embed.unsqueeze(0).to(patches.dtype)
    q = pool.q(pool.latent).reshape(1, pool.latent_len, pool.num_heads, pool.head_dim).transpose(1, 2)
    k = pool.kv(x).reshape(b, n, 2, pool.num_heads, pool.head_dim)[:, :, 0].transpose(1, 2)
    q, k = pool.q_norm(q), pool.k_norm(k)
    return ((q * pool.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def measured_blocks(depth: int, blocks: Sequence[int] | None) -> list[int]:
    """Block indices (``0..depth-1``) to measure: ``blocks`` (negative from the end; ``None``: all), and the last."""
    return sorted({*(block_index(b, depth) for b in (range(depth) if blocks is None else blocks)), depth - 1})


@contextmanager
def _captured(model: Backbone) -> Iterator[dict[str, Tensor]]:
    """Hooks filling ``embeddings``, ``last_input`` and ``attention`` (last block) during one pass."""
    captured: dict[str, Tensor] = {}
    last = model.blocks[-1]
    attention: Any = getattr(last, "attn", None)
    if not (hasattr(attention, "fused_attn") and isinstance(getattr(attention, "attn_drop", None), nn.Module)):
        raise RegablateError(
            f"cannot read attention maps of {type(last).__name__}: it has no timm Attention with attn_drop"
        )

    def keep(name: str, from_input: bool = False):
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
