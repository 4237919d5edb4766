"""Where each kind of token sits in a backbone's sequence, and what its global feature is.

Every regablate backbone lays its tokens out as ``[CLS, REG_1..REG_R, TTR, PATCH_1..PATCH_N]``:
the class token only where the ViT has one (SigLIP and average-pooled ViTs have none, and then
the sequence starts with the registers), the R trained registers, a test-time register
(``regablate.artifacts.register_neurons``) only where one was added, then the patches. Code that
slices the sequence asks a :class:`TokenLayout` instead of assuming ``1 + R`` prefix tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias, TypeGuard

from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

# The two timm families regablate builds: VisionTransformer (vit_*, deit_*) and Eva (DINOv3,
# vit_*_rope_*, EVA-02, PE). Both lay tokens out as [CLS?, reg_token, patches].
Backbone: TypeAlias = VisionTransformer | Eva

# What the global feature of a ViT is, by its timm ``global_pool`` (registers are never part of it).
GLOBAL_FEATURES = {
    "token": "cls",
    "avg": "mean of the patch tokens",
    "max": "max of the patch tokens",
    "avgmax": "(mean + max) / 2 of the patch tokens",
    "map": "attention pool (attn_pool) over the patch tokens",
}


@dataclass(frozen=True)
class TokenLayout:
    """The token roles of one backbone's sequence.

    ``num_registers`` counts the trained registers, ``test_time_registers`` the extra token a
    test-time register adds (0 or 1); both sit after the class token, if any, and before the patches.
    """

    has_cls: bool
    num_registers: int
    test_time_registers: int = 0

    @classmethod
    def of(cls, model: Backbone) -> TokenLayout:
        has_cls = getattr(model, "cls_token", None) is not None
        registers = num_registers_of(model)
        extra = model.num_prefix_tokens - int(has_cls) - registers
        return cls(has_cls=has_cls, num_registers=registers, test_time_registers=extra)

    @property
    def num_prefix(self) -> int:
        """Tokens before the first patch."""
        return int(self.has_cls) + self.num_registers + self.test_time_registers

    @property
    def cls_index(self) -> int | None:
        return 0 if self.has_cls else None

    @property
    def registers(self) -> slice:
        """The register tokens, trained ones first, then a test-time register."""
        return slice(int(self.has_cls), self.num_prefix)

    @property
    def num_all_registers(self) -> int:
        return self.num_registers + self.test_time_registers

    @property
    def patches(self) -> slice:
        return slice(self.num_prefix, None)


def num_registers_of(model: nn.Module) -> int:
    """The trained registers of a timm ViT of either family (``VisionTransformer`` or ``Eva``).

    Both keep them in ``reg_token`` (``None`` without registers); only ``VisionTransformer`` also
    has a ``num_reg_tokens`` attribute, so the parameter is what is read.
    """
    reg_token = getattr(model, "reg_token", None)
    return 0 if reg_token is None else int(reg_token.shape[1])


def is_backbone(module: object) -> TypeGuard[Backbone]:
    """Whether ``module`` is a timm ViT of a family regablate builds (``VisionTransformer`` or ``Eva``)."""
    return isinstance(module, (VisionTransformer, Eva))


def set_num_prefix_tokens(model: Backbone, count: int) -> None:
    """Make ``model`` treat its first ``count`` tokens as prefix tokens (class token, registers).

    The model slices its outputs by ``num_prefix_tokens``; an Eva's attention layers also keep
    their own count, the tokens they leave unrotated by RoPE, so a register added or removed for
    a pass (a test-time register, fewer registers) is never rotated and every patch still is.
    """
    model.num_prefix_tokens = count
    for block in model.blocks:
        attention = getattr(block, "attn", None)
        if isinstance(getattr(attention, "num_prefix_tokens", None), int):
            attention.num_prefix_tokens = count  # type: ignore[union-attr]


def set_registers(model: Backbone, reg_token: nn.Parameter | None) -> None:
    """Give ``model`` the registers ``reg_token`` ``(1, R', D)`` (``None``: none) in place of its own.

    Every count that depends on them follows (``VisionTransformer`` also keeps ``num_reg_tokens``).
    """
    before = num_registers_of(model)
    model.reg_token = reg_token
    after = num_registers_of(model)
    if hasattr(model, "num_reg_tokens"):
        model.num_reg_tokens = after
    set_num_prefix_tokens(model, model.num_prefix_tokens - before + after)


def global_feature_name(model: Backbone) -> str:
    """What ``TokenFeatures.pooled`` is for ``model`` (probe.json and the README say it)."""
    pooled = GLOBAL_FEATURES.get(model.global_pool, model.global_pool)
    has_fc_norm = type(model.fc_norm).__name__ != "Identity"
    return f"{pooled}, then fc_norm" if has_fc_norm else pooled
