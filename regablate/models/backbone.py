"""timm Vision Transformers with R register tokens in the DINOv2 layout, and one features call.

Every backbone regablate builds uses the DINOv2 layout: the token sequence is
``[CLS, REG_1 .. REG_R, PATCH_1 .. PATCH_N]`` (``[REG_1 .. REG_R, PATCH_1 .. PATCH_N]`` for ViTs
without a class token, such as SigLIP or average-pooled ViTs) and only the patches carry a
position embedding (timm's ``no_embed_class=True``). Weights from a checkpoint or timm's hub are
converted to it by ``regablate.models.convert``; the weights also decide whether the model has
a class token and how it pools (``convert.architecture_of``), so a checkpoint of an avg-pool ViT
without a class token loads under any ``vit_*`` name of its sizes.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import timm
import torch
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from regablate.errors import RegablateError
from regablate.models.convert import architecture_of, convert_state_dict, load_state_dict_file
from regablate.models.layout import GLOBAL_FEATURES, Backbone, TokenLayout
from regablate.models.upstream import to_timm_layout

# The timm module of each family's registered models, and the class they build.
_FAMILIES: dict[str, type[nn.Module]] = {
    "timm.models.vision_transformer": VisionTransformer,
    "timm.models.deit": VisionTransformer,
    "timm.models.eva": Eva,  # DINOv3, vit_*_rope_*, EVA-02, Perception Encoder
}
# timm arguments regablate sets itself, and why.
_LAYOUT_KWARGS = {
    "reg_tokens": "use num_registers instead",
    "num_reg_tokens": "use num_registers instead",
    "no_embed_class": "regablate always uses the DINOv2 layout",
    "pool_include_prefix": "registers never enter the global feature",
}


def build_backbone(
    model_name: str,
    num_registers: int,
    *,
    checkpoint: str | Path | dict[str, Tensor] | None = None,
    pretrained: bool = False,
    register_init_std: float = 0.02,
    **timm_kwargs: Any,
) -> Backbone:
    """Build a headless timm ViT with ``num_registers`` registers in the DINOv2 layout.

    Args:
        model_name: any timm ViT name (``vit_small_patch14_dinov2``, ``vit_base_patch16_siglip_224``, ...).
        num_registers: number of register tokens R >= 0.
        checkpoint: local ``.safetensors``, ``.pt``, ``.pth`` or Lightning ``.ckpt`` file (or its
            tensors) trained with any register count, in timm's names or the upstream dinov2/dinov3
            repositories' (``regablate.models.upstream``); converted as described in the module
            docstring. Its tensors decide ``class_token``, whether ``global_pool`` is ``map`` (an
            ``attn_pool``) and where the final norm sits (``fc_norm``/``final_norm``); given values
            that contradict them fail.
        pretrained: load timm's pretrained weights for ``model_name`` (through timm's own hub
            loading, so it needs network access or a populated cache) and convert them.
        register_init_std: standard deviation of the normal that new registers start from
            when weights are loaded.
        **timm_kwargs: passed to ``timm.create_model`` (``img_size``, ``patch_size``, ``embed_dim``,
            ``depth``, ``num_heads``, ``drop_path_rate``, ``class_token``, ``global_pool``, ...). A ViT
            without a class token pools with ``avg`` unless ``global_pool`` says otherwise.
    """
    if isinstance(num_registers, bool) or not isinstance(num_registers, int) or num_registers < 0:
        raise RegablateError(
            f"num_registers must be an integer >= 0 (the paper uses 0/1/2/4/8/16), got {num_registers!r}"
        )
    if checkpoint is not None and pretrained:
        raise RegablateError("give either checkpoint or pretrained=True, not both")
    for key, why in _LAYOUT_KWARGS.items():
        if key in timm_kwargs:
            raise RegablateError(f"timm argument {key!r} cannot be set: {why}")
    family = _family_of(model_name)
    source: dict[str, Tensor] | None = None
    if pretrained:
        source = timm.create_model(model_name, pretrained=True, num_classes=0).state_dict()
    elif isinstance(checkpoint, dict):
        source = checkpoint
    elif checkpoint is not None:
        source = load_state_dict_file(checkpoint)
    kwargs: dict[str, Any] = {"num_classes": 0, **timm_kwargs}
    if family is Eva:
        # Eva takes its register count as num_reg_tokens and keeps RoPE off every prefix token
        # (EvaAttention rotates only tokens after num_prefix_tokens); its head arguments stay timm's.
        kwargs["num_reg_tokens"] = num_registers
    else:
        kwargs.update(reg_tokens=num_registers, **_head_arguments(model_name, timm_kwargs, source))
    try:
        model = timm.create_model(model_name, pretrained=False, no_embed_class=True, **kwargs)
    except TypeError as err:
        raise RegablateError(f"bad timm arguments for {model_name}: {err}") from None
    if type(model) is not family or not isinstance(model, (VisionTransformer, Eva)):
        raise RegablateError(
            f"{model_name} builds a {type(model).__name__}, not a plain timm VisionTransformer; "
            "pick a vit_* or deit_* model without a distillation token"
        )
    _check_patch_grid(model, model_name)
    if source is not None:
        converted = convert_state_dict(to_timm_layout(source, model), model, register_init_std=register_init_std)
        model.load_state_dict(converted, strict=True)
    return model


def _head_arguments(model_name: str, given: dict[str, Any], source: dict[str, Tensor] | None) -> dict[str, Any]:
    """``class_token`` and ``global_pool`` (and, from weights, ``fc_norm``/``final_norm``) to build with.

    The weights decide what they can tell (a class token, an attention pool, the final norm); the
    given arguments or the model's own defaults decide the rest (avg, max or avgmax pooling).
    """
    default_class_token, default_pool = _default_head(model_name)
    class_token = bool(given.get("class_token", default_class_token))
    pool = given.get("global_pool")
    decided: dict[str, Any] = {}
    if source is not None:
        weights = architecture_of(source)
        for key in ("class_token", "fc_norm", "final_norm"):
            if given.get(key) is not None and bool(given[key]) != weights[key]:
                raise RegablateError(
                    f"{key}={given[key]} contradicts the weights ({key} {weights[key]}); leave {key} out, "
                    "the weights decide it"
                )
        if pool is not None and (pool == "map") != weights["attn_pool"]:
            has = "an attention pool (attn_pool)" if weights["attn_pool"] else "no attention pool"
            raise RegablateError(f"global_pool={pool!r} contradicts the weights, which have {has}; leave it out")
        class_token = weights["class_token"]
        if weights["attn_pool"]:
            pool = "map"
        decided = {"fc_norm": weights["fc_norm"]}
        if not weights["final_norm"]:
            decided["final_norm"] = False
    if pool is None:
        pool = default_pool
        if pool == "map" and source is not None:  # weights without an attention pool
            pool = "token"
        if pool == "token" and not class_token:
            pool = "avg"
    if pool not in GLOBAL_FEATURES:
        raise RegablateError(
            f"global_pool {pool!r} is not supported: use {', '.join(GLOBAL_FEATURES)} (registers stay out of the pool)"
        )
    if pool == "token" and not class_token:
        raise RegablateError("global_pool 'token' needs the class token; a ViT without one pools with avg or map")
    return {"class_token": class_token, "global_pool": pool, **decided}


@functools.lru_cache(maxsize=64)
def _default_head(model_name: str) -> tuple[bool, str]:
    """Whether timm builds ``model_name`` with a class token, and its ``global_pool`` (a meta-device build, once)."""
    with torch.device("meta"):
        model = timm.create_model(model_name, num_classes=0)
    return model.cls_token is not None, str(model.global_pool)


def _family_of(model_name: str) -> type[nn.Module]:
    """The timm class ``model_name`` must build (``VisionTransformer`` or ``Eva``); unknown names are refused."""
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('vit_*')"
        raise RegablateError(f"unknown timm model {model_name!r}{hint}")
    module = timm.models.model_entrypoint(model_name).__module__
    if module not in _FAMILIES:
        raise RegablateError(
            f"{model_name} is not a Vision Transformer (timm builds it in {module}); registers need a timm "
            "VisionTransformer such as vit_small_patch16_224 or an Eva such as vit_small_patch16_dinov3"
        )
    return _FAMILIES[module]


def _check_patch_grid(model: Backbone, model_name: str) -> None:
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

    ``registers`` and ``patches`` are the final tokens (after the final norm, where the model has
    one: an avg-pool ViT with ``fc_norm`` normalises only its pooled feature); with a test-time
    register (``regablate.artifacts.register_neurons``), ``registers`` ends with it. ``cls`` is the
    final class token, ``None`` for a ViT without one. ``pooled`` is the model's global feature,
    what its own head would read (see :func:`global_feature`): the class token for ``token``
    pooling, else the pool of the patch tokens, never of the registers. ``blocks`` maps a block
    index to that block's output, the whole ``[CLS, REG, PATCH]`` sequence of the residual stream
    *before* the final norm, which would hide the high norms.
    """

    cls: Tensor | None
    registers: Tensor
    patches: Tensor
    pooled: Tensor
    blocks: dict[int, Tensor]


def extract_features(model: Backbone, images: Tensor, blocks: Sequence[int] = ()) -> TokenFeatures:
    """Run ``model`` once; return its final tokens split by role, its global feature, and the chosen blocks pre-norm.

    ``blocks`` takes indices into ``model.blocks``; negative ones count from the end.
    """
    depth = len(model.blocks)
    layout = TokenLayout.of(model)
    wanted = sorted({block_index(i, depth) for i in blocks})
    if wanted:
        with_prefix = layout.num_prefix > 0  # timm returns bare patch tensors for a model without prefix tokens
        tokens, inter = cast(
            "tuple[Tensor, list[Any]]",  # final tokens and the blocks' outputs (intermediates_only=False)
            model.forward_intermediates(
                images, indices=wanted, return_prefix_tokens=with_prefix, norm=False, output_fmt="NLC"
            ),
        )
        taken = {i: torch.cat([item[1], item[0]], dim=1) if with_prefix else item for i, item in zip(wanted, inter)}
        by_request = {i: taken[block_index(i, depth)] for i in blocks}
    else:
        tokens = model.forward_features(images)
        by_request = {}
    return TokenFeatures(
        cls=tokens[:, layout.cls_index] if layout.has_cls else None,
        registers=tokens[:, layout.registers],
        patches=tokens[:, layout.patches],
        pooled=global_feature(model, tokens),
        blocks=by_request,
    )


def global_feature(model: Backbone, tokens: Tensor) -> Tensor:
    """The global feature of ``model``'s final ``tokens`` ``(B, T, D) -> (B, D)``, registers left out.

    timm's own pooling (``token``: the class token; ``avg``/``max``/``avgmax``: of the patch tokens;
    ``map``: the attention pool, fed the patch tokens only) followed by ``fc_norm``, as timm's
    head computes it before its classifier (without the head's dropout).
    """
    if model.attn_pool is not None:
        pooled = model.attn_pool(tokens[:, model.num_prefix_tokens :])
    else:
        pooled = model.pool(tokens)
    return model.fc_norm(pooled)


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
