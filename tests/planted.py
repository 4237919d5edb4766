"""A tiny ViT with planted register-style artifacts, made by editing weights (so it survives saving).

* Channel ``MARKER`` is emptied (patch embedding and position embedding), then the position
  embedding puts a small marker (3) in it on the planted patch positions; on its own the marker
  keeps those tokens' norms ordinary (under 2x the median).
* Block ``onset``'s MLP: hidden ``units`` (default: unit 0) fire only on the marker and together
  write ``NORM`` into channel ``CHANNEL``, so the planted tokens get ~40x the median norm from that
  block on, in one channel: these units are the model's "register neurons".
* Last block (unless ``sink=False``): the query bias and the key weights of channel ``CHANNEL``
  point the same way, so every token attends to the planted tokens: an attention sink, as real
  artifacts are; an attention pool (``map`` models) gets the same edit, so its query looks at them too.
  With ``sink=False`` the planted tokens are high-norm tokens that draw no attention, like the
  large foreground features of a small ViT trained hard.

``tiny_vit`` builds the 4-block model with a class token, or without one (``class_token=False``,
``global_pool`` avg or map: the layouts of average-pooled ViTs and SigLIP).
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.hooks import RemovableHandle

from regablate.models import build_backbone

MODEL = "vit_tiny_patch16_224"
# 32 px, 8x8 patches of 4 px, 4 blocks: room for a middle block.
SIZES = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2}
CORNERS = (0, 7, 56, 63)
MARKER, CHANNEL, NORM = 5, 11, 100.0


def tiny_vit(num_registers: int = 2, seed: int = 0, **layout) -> VisionTransformer:
    torch.manual_seed(seed)
    return build_backbone(MODEL, num_registers, **SIZES, **layout)


@torch.no_grad()
def plant_artifacts(
    model: VisionTransformer,
    onset: int = 1,
    positions: tuple[int, ...] = CORNERS,
    units: tuple[int, ...] = (0,),
    sink: bool = True,
) -> VisionTransformer:
    dim = model.embed_dim
    model.patch_embed.proj.weight[MARKER] = 0.0
    model.patch_embed.proj.bias[MARKER] = 0.0
    model.pos_embed[0, :, MARKER] = 0.0
    model.pos_embed[0, list(positions), MARKER] = 3.0
    mlp = model.blocks[onset].mlp
    units = list(units)
    mlp.fc1.weight[units] = 0.0
    mlp.fc1.weight[units, MARKER] = 10.0  # LayerNorm makes the marker > 4 on planted tokens, ~0 elsewhere
    mlp.fc1.bias[units] = -15.0
    mlp.fc2.weight[:, units] = 0.0
    mlp.fc2.weight[CHANNEL, units] = NORM / 10.0 / len(units)
    if not sink:
        return model
    attn = model.blocks[-1].attn
    direction = torch.full((dim,), 4.0 / attn.head_dim**0.5)
    attn.qkv.bias[:dim] = direction  # every query points along `direction`
    attn.qkv.weight[dim : 2 * dim, CHANNEL] = direction  # keys of tokens big in CHANNEL do too
    pool = model.attn_pool
    if pool is not None:  # the pool's latent query, on the final (normed) tokens
        pool.q.weight.zero_()
        pool.q.bias.copy_(direction)
        pool.kv.weight[:dim, CHANNEL] = direction
    return model


def copy_global_feature(
    model: VisionTransformer, block: int = 1, positions: tuple[int, ...] = CORNERS
) -> RemovableHandle:
    """From block ``block`` on, the planted positions hold the image's mean patch token, not their own.

    A forward hook (so it does not survive saving): after ``block``, each planted token is replaced by
    the mean of the image's patch tokens, keeping its own ``CHANNEL`` (the planted high norm). The
    planted tokens then carry global information and lose their position and pixels, as the paper's
    outlier tokens do (Sec. 2.1). Returns the hook's handle.
    """
    start = model.num_prefix_tokens
    planted = [start + p for p in positions]

    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        copied = output[:, start:].mean(dim=1, keepdim=True).expand(-1, len(planted), -1).clone()
        copied[..., CHANNEL] = output[:, planted, CHANNEL]
        output = output.clone()
        output[:, planted] = copied
        return output

    return model.blocks[block].register_forward_hook(hook)
