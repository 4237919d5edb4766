"""Checkpoints in the layouts of the upstream repositories, facebookresearch/dinov2 and facebookresearch/dinov3.

Both keep the registers under their own names (``register_tokens``, ``storage_tokens``) and
carry a ``mask_token`` for masked-image training. timm's own checkpoint filters already translate
them (``_convert_dinov2`` in ``timm.models.vision_transformer``, ``checkpoint_filter_fn`` in
``timm.models.eva``); this module recognises the layouts and hands them to those filters, so that
``regablate.models.convert`` sees timm's names. The one layout timm's filter does not know,
dinov2's chunked blocks (``blocks.<chunk>.<index>.``), is flattened first.
"""

from __future__ import annotations

import re

import torch
from timm.models import eva, vision_transformer
from timm.models.eva import Eva
from torch import Tensor

from regablate.errors import RegablateError
from regablate.models.layout import Backbone

_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


# Tensors only the upstream layouts have, by the timm family that reads them.
_DINOV2_MARKERS = ("mask_token", "register_tokens")
_DINOV3_MARKERS = ("storage_tokens", "rope_embed.periods")


def is_upstream(source: dict[str, Tensor], model: Backbone) -> bool:
    """Whether ``source`` is a backbone in the upstream layout of ``model``'s family (dinov3 for an
    Eva, dinov2 for a VisionTransformer), its keys without a prefix.

    A regablate training checkpoint also holds a ``mask_token`` (iBOT), but beside prefixed
    backbone keys (``student.backbone.``), so it is not taken for one.
    """
    markers = _DINOV3_MARKERS if isinstance(model, Eva) else _DINOV2_MARKERS
    return "patch_embed.proj.weight" in source and any(key in source for key in markers)


def to_timm_layout(source: dict[str, Tensor], model: Backbone) -> dict[str, Tensor]:
    """``source`` in timm's names for ``model`` when it is in an upstream layout; else ``source`` itself.

    The patch embedding must already fit: timm's filters would resample another patch size silently.
    """
    if not is_upstream(source, model):
        return source
    given, expected = source["patch_embed.proj.weight"], model.patch_embed.proj.weight
    if given.shape != expected.shape:
        raise RegablateError(
            f"checkpoint tensor patch_embed.proj.weight has shape {tuple(given.shape)} but the model expects "
            f"{tuple(expected.shape)}; pick the --model of the checkpoint's sizes"
        )
    if isinstance(model, Eva):
        return _from_dinov3(source, model)
    return vision_transformer._convert_dinov2(_unchunked(source), model)


def _unchunked(source: dict[str, Tensor]) -> dict[str, Tensor]:
    """dinov2's ``block_chunks`` layout (``blocks.<chunk>.<index>.``) as plain ``blocks.<index>.``."""
    return {_CHUNKED_BLOCK.sub(r"blocks.\1.", key): value for key, value in source.items()}


def _from_dinov3(source: dict[str, Tensor], model: Eva) -> dict[str, Tensor]:
    """A dinov3 state dict through timm's Eva filter.

    timm's filter keys on ``storage_tokens``, which a model without registers lacks, and would
    silently drop a query/value bias the model has no place for; both are settled here.
    """
    source = dict(source)
    dim = source["cls_token"].shape[-1] if "cls_token" in source else model.embed_dim
    source.setdefault("storage_tokens", torch.zeros(1, 0, dim))
    has_bias = any(name.endswith(".attn.q_bias") for name, _ in model.named_parameters())
    for key in [k for k in source if k.endswith("attn.qkv.bias")]:
        if has_bias:
            continue
        query, _, value = source.pop(key).chunk(3)  # the key bias is masked to 0 upstream
        if query.any() or value.any():
            raise RegablateError(
                f"checkpoint tensor {key} is not zero but the model has no qkv bias; pick the model's _qkvb variant"
            )
    return eva.checkpoint_filter_fn(source, model)
