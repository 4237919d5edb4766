"""timm Vision Transformers with R register tokens in the DINOv2 layout, and one features call.

Every backbone regablate builds uses the DINOv2 layout: the token sequence is
``[CLS, REG_1 .. REG_R, PATCH_1 .. PATCH_N]`` and only the patches carry a position
embedding (timm's ``no_embed_class=True``). Weights from a checkpoint or timm's hub are
converted to it by ``regablate.models.convert``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from regablate.errors import RegablateError
from regablate.models.convert import convert_state_dict, load_state_dict_file

# Modules whose registered models are plain timm VisionTransformers.
_VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit")
# timm arguments regablate sets itself: the layout is not negotiable.
_LAYOUT_KWARGS = {"reg_tokens": "num_registers", "no_embed_class": None, "class_token": None}


def build_backbone(
    model_name: str,
    num_registers: int,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    register_init_std: float = 0.02,
    **timm_kwargs: Any,
) -> VisionTransformer:
    """Build a headless timm ViT with ``num_registers`` registers in the DINOv2 layout.

    Args:
        model_name: any timm ViT name (``vit_small_patch14_dinov2``, ``test_vit``, ...).
        num_registers: number of register tokens R >= 0.
        checkpoint: local ``.safetensors``, ``.pt``, ``.pth`` or Lightning ``.ckpt`` file trained
            with any register count; converted as described in the module docstring.
        pretrained: load timm's pretrained weights for ``model_name`` (through timm's own hub
            loading, so it needs network access or a populated cache) and convert them.
        register_init_std: standard deviation of the normal that new registers start from
            when weights are loaded.
        **timm_kwargs: passed to ``timm.create_model`` (``img_size``, ``patch_size``,
            ``embed_dim``, ``depth``, ``num_heads``, ``drop_path_rate``, ...).
    """
    if isinstance(num_registers, bool) or not isinstance(num_registers, int) or num_registers < 0:
        raise RegablateError(
            f"num_registers must be an integer >= 0 (the paper uses 0/1/2/4/8/16), got {num_registers!r}"
        )
    if checkpoint is not None and pretrained:
        raise RegablateError("give either checkpoint or pretrained=True, not both")
    for key, instead in _LAYOUT_KWARGS.items():
        if key in timm_kwargs:
            hint = "use num_registers instead" if instead else "regablate always uses the DINOv2 layout"
            raise RegablateError(f"timm argument {key!r} cannot be set: {hint}")
    _check_vit_name(model_name)
    kwargs = {"num_classes": 0, **timm_kwargs}
    try:
        model = timm.create_model(
            model_name,
            pretrained=False,
            reg_tokens=num_registers,
            no_embed_class=True,
            class_token=True,
            **kwargs,
        )
    except TypeError as err:
        raise RegablateError(f"bad timm arguments for {model_name}: {err}") from None
    if type(model) is not VisionTransformer:
        raise RegablateError(
            f"{model_name} builds a {type(model).__name__}, not a plain timm VisionTransformer; "
            "pick a vit_* or deit_* model without a distillation token"
        )
    _check_patch_grid(model, model_name)

    source: dict[str, Tensor] | None = None
    if pretrained:
        source = timm.create_model(model_name, pretrained=True, num_classes=0).state_dict()
    elif checkpoint is not None:
        source = load_state_dict_file(checkpoint)
    if source is not None:
        converted = convert_state_dict(source, model, register_init_std=register_init_std)
        model.load_state_dict(converted, strict=True)
    return model


def _check_vit_name(model_name: str) -> None:
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('vit_*')"
        raise RegablateError(f"unknown timm model {model_name!r}{hint}")
    module = timm.models.model_entrypoint(model_name).__module__
    if module not in _VIT_MODULES:
        raise RegablateError(
            f"{model_name} is not a Vision Transformer (timm builds it in {module}); "
            "registers need a timm VisionTransformer such as vit_small_patch16_224"
        )


def _check_patch_grid(model: VisionTransformer, model_name: str) -> None:
    img_size = model.patch_embed.img_size
    patch_size = model.patch_embed.patch_size
    if img_size is None:
        return
    if any(i % p for i, p in zip(img_size, patch_size)):
        raise RegablateError(
            f"img_size {tuple(img_size)} of {model_name} is not divisible by its patch size "
            f"{tuple(patch_size)}; pick an img_size that is a multiple of the patch size"
        )


@dataclass
class TokenFeatures:
    """What one backbone pass returns.

    ``cls``, ``registers`` and ``patches`` come after the final LayerNorm (what heads use); with a
    test-time register (``regablate.artifacts.register_neurons``), ``registers`` ends with it;
    ``blocks`` maps a block index to that block's output, the whole ``[CLS, REG, PATCH]``
    sequence of the residual stream *before* the final norm, which would hide the high norms.
    """

    cls: Tensor
    registers: Tensor
    patches: Tensor
    blocks: dict[int, Tensor]


def extract_features(model: VisionTransformer, images: Tensor, blocks: Sequence[int] = ()) -> TokenFeatures:
    """Run ``model`` once; return its final tokens split by role, and the chosen blocks pre-norm.

    ``blocks`` takes indices into ``model.blocks``; negative ones count from the end.
    """
    depth = len(model.blocks)
    wanted = sorted({block_index(i, depth) for i in blocks})
    if wanted:
        tokens, inter = model.forward_intermediates(
            images, indices=wanted, return_prefix_tokens=True, norm=False, output_fmt="NLC"
        )
        taken = {i: torch.cat([prefix, patches], dim=1) for i, (patches, prefix) in zip(wanted, inter)}
        by_request = {i: taken[block_index(i, depth)] for i in blocks}
    else:
        tokens = model.forward_features(images)
        by_request = {}
    num_prefix = model.num_prefix_tokens
    return TokenFeatures(
        cls=tokens[:, 0],
        registers=tokens[:, 1:num_prefix],
        patches=tokens[:, num_prefix:],
        blocks=by_request,
    )


def block_index(index: int, depth: int) -> int:
    if not -depth <= index < depth:
        raise RegablateError(f"block index {index} is out of range for a ViT with {depth} blocks")
    return index % depth


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for a pass; every submodule gets its own mode back (frozen parts stay frozen)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.train(training)
